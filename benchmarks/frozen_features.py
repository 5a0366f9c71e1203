"""Frozen-feature fast path against the token path: wall and CPU time per federated round.

The same run twice, ``model.transfer = "frozen"`` with MiniLM on Rotten Tomatoes split by movie
(every movie a client), cohorts of about 100 clients a round: the token path runs the frozen
encoder on every batch of every client (``model.feature_cache = false``), the fast path trains
the head on pooled features computed once and cached (``true``, cache warm; the one-time
computation is timed separately with an empty cache). Each run is a fresh ``fedtune run``
process, the two sides alternate (A B A B ...), and the script prints medians of wall time and
CPU time (user + system of the child) per round, the speed-up, and each run's accuracy. A last
run shows the fast path at 1,000 clients (``data.partitioner = inner_dirichlet``).

    flock /tmp/fedtune-heavy.lock python benchmarks/frozen_features.py
    python benchmarks/frozen_features.py --repeats 1 --slow-rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["data.dataset=rotten_tomatoes", "data.partitioner=natural", "data.num_clients=507",
          "data.max_examples=0", "model.transfer=frozen", "model.max_length=48",
          "client.optimizer=sgd", "client.lr=0.5", "client.local_steps=0",
          "client.local_epochs=1", "client.batch_size=16", "strategy.fraction_train=0.2",
          "strategy.fraction_evaluate=0", "engine.backend=inprocess", "run.checkpoint_every=0"]


def run(overrides: list[str], output: Path, env: dict[str, str]) -> dict:
    """One ``fedtune run`` in its own process: wall, CPU seconds and its metrics rows."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtune", "run", "--output", str(output),
                    *[f"--set={o}" for o in overrides]], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with (output / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((output / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime),
            "round_s": [float(r["wall_s"]) for r in rows],
            "accuracy": summary["final"]["eval_accuracy"],
            "clients_per_round": statistics.mean(int(r["clients_sampled"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs")
    parser.add_argument("--slow-rounds", type=int, default=3)
    parser.add_argument("--fast-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        print(f"machine: {os.cpu_count()} CPU cores, torch threads {args.threads}")
        # the one-time computation of the pooled features, with an empty cache
        cold_env = {**env, "FEDTUNE_CACHE": str(base / "cache")}
        cold = run([*COMMON, "run.rounds=1"], base / "cold", cold_env)
        print(f"fast path, empty cache, 1 round: {cold['wall_s']:.1f} s wall, "
              f"{cold['cpu_s']:.1f} s CPU (computes the features of 12,752 texts once)")
        results: dict[str, list[dict]] = {"token path": [], "feature path": []}
        for repeat in range(args.repeats):
            for side, extra in (("token path", ["model.feature_cache=false",
                                                f"run.rounds={args.slow_rounds}"]),
                                ("feature path", [f"run.rounds={args.fast_rounds}"])):
                outcome = run([*COMMON, *extra], base / f"{side[0]}{repeat}", cold_env)
                results[side].append(outcome)
                print(f"  {side} #{repeat + 1}: {outcome['wall_s']:.1f} s wall, "
                      f"{outcome['cpu_s']:.1f} s CPU, rounds {outcome['round_s']}, "
                      f"accuracy {outcome['accuracy']:.4f}", flush=True)
        print("\n| path | runs | rounds | clients/round | median s/round (wall) | "
              "median CPU s/round | final accuracy |")
        print("|---|---|---|---|---|---|---|")
        medians = {}
        for side, outcomes in results.items():
            per_round = statistics.median(s for o in outcomes for s in o["round_s"])
            cpu = statistics.median(o["cpu_s"] / len(o["round_s"]) for o in outcomes)
            medians[side] = (per_round, cpu)
            print(f"| {side} | {len(outcomes)} | {len(outcomes[0]['round_s'])} | "
                  f"{outcomes[0]['clients_per_round']:.0f} | {per_round:.2f} | {cpu:.2f} | "
                  + ", ".join(f"{o['accuracy']:.4f}" for o in outcomes) + " |")
        print(f"\nspeed-up per round: {medians['token path'][0] / medians['feature path'][0]:.1f}x"
              f" wall, {medians['token path'][1] / medians['feature path'][1]:.1f}x CPU "
              "(CPU per round includes process start and model loading)")
        big = run([*COMMON, "data.partitioner=inner_dirichlet", "data.num_clients=1000",
                   "strategy.fraction_train=0.1", "run.rounds=5"], base / "big", cold_env)
        print(f"feature path, 1,000 clients (inner_dirichlet), "
              f"{big['clients_per_round']:.0f} clients/round: median "
              f"{statistics.median(big['round_s']):.2f} s/round, {big['wall_s']:.1f} s wall "
              f"for 5 rounds with start-up, accuracy {big['accuracy']:.4f}")


if __name__ == "__main__":
    main()
