"""What an attack costs a round of fedtune's cohort engine (issue 29: within 1.5x of a clean
round at 1,000 clients).

The workload of ``engine_benchmarks.py rounds`` (MLP 1024->64->2 on hashed Rotten Tomatoes,
IID, one local AdamW step of batch 8, every client every round), FedAvg, clean and with 20% of
the clients attacking: sign flipping (an update attack that needs nothing more), ALIE and
min-max (colluders train their group's data: the dearest attacks; ALIE both as one group of all
attackers, the default, and in groups of 10, ``attack.collude``) and a backdoor (a data attack:
the text trigger is encoded once, before the first round). Each condition is a child process
measured as ``engine_benchmarks.py`` measures one (wall and CPU seconds of the whole process
tree, Ray's actors included, per round); the first round pays for warm-up and is left out. The
conditions run alternated (clean, attack 1, ..., clean, attack 1, ...: ``--repeats`` cycles),
so that a load that drifts on a shared machine falls on all of them alike; the table gives the
median over every timed round of every cycle with its range, and the ratio to the clean median.

    python benchmarks/attack_overhead.py                                  # the full check
    python benchmarks/attack_overhead.py --clients 100 --rounds 2 --repeats 1 \\
        --backend inprocess                                               # tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_benchmarks import fedtune_command, run_side, steady

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
    "alie 20% one group": ["attack.name=alie", "attack.fraction=0.2"],
    "alie 20% groups of 10": ["attack.name=alie", "attack.fraction=0.2", "attack.collude=10"],
    "min_max 20%": ["attack.name=min_max", "attack.fraction=0.2"],
    "backdoor 20%": ["attack.name=backdoor", "attack.fraction=0.2"],
}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternated cycles")
    parser.add_argument("--backend", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--only", default="", help="comma-separated condition names")
    parser.add_argument("--set", action="append", default=[], help="extra override (all)")
    args = parser.parse_args()
    names = [n for n in CONDITIONS if not args.only or n in args.only.split(",")]
    if "clean" not in names:
        names.insert(0, "clean")
    base = [*WORKLOAD, f"data.num_clients={args.clients}", f"run.rounds={args.rounds}",
            f"engine.backend={args.backend}", *args.set]
    print(f"{args.clients} clients, {args.rounds} rounds ({args.rounds - 1} timed), "
          f"{args.backend}, {args.repeats} alternated cycles; load average at start: "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for cycle in range(args.repeats):
            for name in names:
                out = Path(tmp) / f"{name.replace(' ', '_').replace('%', '')}-{cycle}"
                lines, _ = run_side(fedtune_command([*base, *CONDITIONS[name]], out))
                rows[name] += steady(lines)
                print(f"  cycle {cycle + 1}, {name}: "
                      f"{statistics.median(r['wall_s'] for r in steady(lines)):.2f} s/round",
                      flush=True)
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    clean_wall = statistics.median(r["wall_s"] for r in rows["clean"])
    clean_cpu = statistics.median(r["cpu_s"] for r in rows["clean"])
    print("| condition | s / round (min-max) | x clean (wall) | CPU-s / round (min-max) | "
          "x clean (CPU) |")
    print("|---|---|---|---|---|")
    for name in names:
        wall = [r["wall_s"] for r in rows[name]]
        cpu = [r["cpu_s"] for r in rows[name]]
        print(f"| {name} | {_spread(wall)} | {statistics.median(wall) / clean_wall:.2f} | "
              f"{_spread(cpu)} | {statistics.median(cpu) / clean_cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
