"""CPU time of the local-DP server's own account of every client (``LocalServer``), no training.

Every round the server composes each accepted client's DP-SGD steps into its history and
computes its ε (``fedtune.privacy.local``: it does not take a client's word). This replays
that account for a Poisson cohort of synthetic clients (sizes 10 to 200 examples, seeded),
``privacy.target_epsilon`` with noise planned for ``privacy.client_rounds``, and prints the CPU
seconds of the noise searches (Opacus' ``get_noise_multiplier``, once per distinct sample rate,
cached) and of the accounts of every round, and the largest ε, so that two versions of the code
can be compared on the same numbers:

    python benchmarks/local_dp_accounting.py                       # 100 clients, 20 rounds
    PYTHONPATH=/path/to/other/checkout python benchmarks/local_dp_accounting.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.2, help="Poisson cohort rate")
    parser.add_argument("--target-epsilon", type=float, default=4.0)
    parser.add_argument("--client-rounds", type=int, default=5,
                        help="rounds each client's noise is planned for (privacy.client_rounds)")
    args = parser.parse_args()

    from fedtune import protocol
    from fedtune.config import load_config
    from fedtune.privacy.dp_sgd import client_noise, poisson_steps
    from fedtune.privacy.local import LocalServer

    config = load_config(None, [
        "data.dataset=digits", "model.kind=mlp", "privacy.mode=local", "privacy.delta=1e-3",
        f"privacy.target_epsilon={args.target_epsilon}",
        f"privacy.client_rounds={args.client_rounds}", "client.local_steps=8",
        "client.batch_size=32", f"run.rounds={args.rounds}"])
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 201, args.clients).tolist()
    server = LocalServer(config, sizes)
    started = time.process_time()
    batches = {poisson_steps(n, 32) for n in sizes}
    for count in batches:  # what the first account of each rate would pay
        client_noise(server._settings(), 1 / count, 8)
    searches = time.process_time() - started
    seconds, accounted = [], 0
    for _ in range(args.rounds):
        cohort = np.flatnonzero(rng.random(args.clients) < args.fraction)
        started = time.process_time()
        server.record_round([], [{protocol.PARTITION_ID: int(c),
                                  protocol.NUM_EXAMPLES: sizes[c]} for c in cohort])
        seconds.append(time.process_time() - started)
        accounted += len(cohort)
    print(f"{args.clients} clients, {args.rounds} rounds, {accounted} client accounts, "
          f"{len(batches)} distinct sample rates: CPU-s noise searches {searches:.2f}, "
          f"accounts {sum(seconds):.2f} ({1000 * sum(seconds) / accounted:.2f} ms each); "
          f"largest epsilon {max(server.client_epsilons.values())!r}")


if __name__ == "__main__":
    main()
