"""What an attack costs a round of fedtune's cohort engine (issue 29: within 1.5x of a clean
round at 1,000 clients).

The workload of ``engine_benchmarks.py rounds`` (MLP 1024->64->2 on hashed Rotten Tomatoes,
IID, one local AdamW step of batch 8, every client every round), FedAvg, clean and with 20% of
the clients attacking: sign flipping (an update attack that needs nothing more), ALIE (colluders
train their group's data: the dearest attack, by ``attack.collude``) and a backdoor (a data
attack: the text trigger is encoded once, before the first round). Each condition is a
``fedtune run`` child process; the first round pays for warm-up and is left out; the table
gives the median wall seconds per round and the ratio to the clean run.

    python benchmarks/attack_overhead.py                                  # the full check
    python benchmarks/attack_overhead.py --clients 100 --rounds 2 --backend inprocess  # tiny
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOAD = [
    "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=1024",
    "model.hidden_sizes=[64]", "model.dropout=0", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.optimizer=adamw", "client.lr=0.1", "strategy.fraction_evaluate=0",
    "strategy.fraction_train=1.0", "engine.node_wait_s=900", "run.checkpoint_every=0",
]
CONDITIONS = {
    "clean": [],
    "sign_flip 20%": ["attack.name=sign_flip", "attack.fraction=0.2"],
    "alie 20% groups of 10": ["attack.name=alie", "attack.fraction=0.2", "attack.collude=10"],
    "alie 20% one group": ["attack.name=alie", "attack.fraction=0.2"],
    "backdoor 20%": ["attack.name=backdoor", "attack.fraction=0.2"],
}


def round_seconds(condition: list[str], args: argparse.Namespace, folder: Path) -> list[float]:
    """Wall seconds of each round after the first."""
    overrides = [*WORKLOAD, f"data.num_clients={args.clients}", f"run.rounds={args.rounds}",
                 f"engine.backend={args.backend}", f"run.dir={folder}", *condition]
    command = [sys.executable, "-m", "fedtune", "run", "--quiet"]
    for setting in overrides:
        command += ["--set", setting]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with (folder / "metrics.csv").open(newline="") as handle:
        return [float(row["wall_s"]) for row in csv.DictReader(handle)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--backend", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--only", default="", help="comma-separated condition names")
    args = parser.parse_args()
    names = [n for n in CONDITIONS if not args.only or n in args.only.split(",")]
    if "clean" not in names:
        names.insert(0, "clean")
    print(f"{args.clients} clients, {args.rounds} rounds ({args.rounds - 1} timed), "
          f"{args.backend}")
    print("| condition | s / round (median) | x clean | wall of the run (s) |")
    print("|---|---|---|---|")
    clean = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            started = time.perf_counter()
            seconds = round_seconds(CONDITIONS[name], args, Path(tmp) / name.replace(" ", "_"))
            median = statistics.median(seconds)
            clean = clean or median
            print(f"| {name} | {median:.3f} | {median / clean:.2f} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
