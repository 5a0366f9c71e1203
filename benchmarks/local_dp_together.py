"""Local DP-SGD clients trained together against Opacus one client at a time (issue 30).

The engine benchmark's MLP workload (``engine_benchmarks.MLP``: MLP 1024->64->2 on hashed
Rotten Tomatoes, IID, batch 8, one local step of fused AdamW, every client every round, the
server's evaluation after every round) under ``privacy.mode = "local"`` (noise multiplier 1,
clip bound 1, secure draws), in process, two ways: clients trained together
(``fedtune.client.private_chunks``, the default) and one at a time through Opacus
(``engine.vectorise_clients = false``). Each run is a child process (one process tree with
this script); the sides alternate (A B A B); the first round of every run is left out
(imports, warm-up); the table gives medians over the other rounds of all repeats with their
min-max, wall and CPU seconds of the whole tree, CPU-ms per client-round, and each side's
accuracy after the last round and the largest client ε (summary.json; the draws are secret, so
the accuracies are alike, not equal, and the ε equal). The CPU time of drawing the secret
Gaussian noise alone (``SecureRandom``, which both sides pay for every parameter of every client
and step) is measured beside it.

    python benchmarks/local_dp_together.py --sizes 200,1000 --rounds 3 --repeats 2 \
        --workloads rt,generated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_benchmarks import GENERATED, MLP, fedtune_command, run_side, steady

LOCAL_DP = ["privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0",
            "engine.backend=inprocess"]
SIDES = {"together (batched DP-SGD)": "true", "one at a time (Opacus)": "false"}
# name -> (overrides, trainable parameters): the engine workload, whose noise dominates, and
# the generated federation's 32-64-2 MLP (8 examples a client), whose noise is cheap
WORKLOADS = {
    "rt": ("MLP 1024-64-2, Rotten Tomatoes", MLP, 1024 * 64 + 64 + 64 * 2 + 2),
    "generated": ("MLP 32-64-2, generated", [o for o in MLP if not o.startswith("data.dataset=")]
                  + GENERATED, 32 * 64 + 64 + 64 * 2 + 2),
}


def _spread(values: list[float], scale: float = 1.0) -> str:
    return (f"{scale * statistics.median(values):.2f} "
            f"({scale * min(values):.2f}-{scale * max(values):.2f})")


def noise_cpu_ms(parameters: int, draws: int = 20) -> float:
    """CPU-ms of one client-step's secret noise (``parameters`` Gaussians from SecureRandom)."""
    from strategies.noise import SecureRandom

    started = time.process_time()
    for _ in range(draws):
        SecureRandom().standard_normal(parameters)
    return 1000 * (time.process_time() - started) / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"commit {commit}; {os.cpu_count()} CPU cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| workload | clients | side | s/round (min-max) | CPU-s/round (min-max) | CPU-ms per "
          "client-round | accuracy (last round, each run) | max client ε | CPU ratio "
          "(one at a time / together) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        for (workload, base, _), n in [(WORKLOADS[w], int(x)) for w in args.workloads.split(",")
                                       for x in args.sizes.split(",")]:
            overrides = [*base, *LOCAL_DP, f"data.num_clients={n}", f"run.rounds={args.rounds}"]
            rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
            finals: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
            for repeat in range(args.repeats):
                for side, flag in SIDES.items():
                    run_dir = out / f"{len(base)}-{n}-{flag}-{repeat}"
                    lines, _ = run_side(fedtune_command(
                        [*overrides, f"engine.vectorise_clients={flag}"], run_dir))
                    rounds[side] += steady(lines)
                    summary = json.loads((run_dir / "summary.json").read_text())
                    finals[side].append((lines[-1]["accuracy"], summary["privacy"]["epsilon"]))
            together = statistics.median(r["cpu_s"] for r in rounds["together (batched DP-SGD)"])
            for side, rows in rounds.items():
                cpu = [r["cpu_s"] for r in rows]
                accuracy = ", ".join(f"{a:.3f}" for a, _ in finals[side])
                epsilon = ", ".join(sorted({f"{e:.4g}" for _, e in finals[side]}))
                print(f"| {workload} | {n:,} | {side} | {_spread([r['wall_s'] for r in rows])} | "
                      f"{_spread(cpu)} | {_spread(cpu, 1000 / n)} | {accuracy} | {epsilon} | "
                      f"{statistics.median(cpu) / together:.2f}x |", flush=True)
    for workload, _, parameters in WORKLOADS.values():
        print(f"secret noise alone, {workload}: {noise_cpu_ms(parameters):.2f} CPU-ms per "
              "client-step (SecureRandom, both sides)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
