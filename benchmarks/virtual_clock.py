"""What the virtual clock costs the engine, and FedBuff's throughput against synchronous rounds.

Issue 28 asks that device profiles do not slow the engine - a 1,000-client synchronous round
with profiles within 1.1x of one without - and that FedBuff with 1,000 clients in flight
processes at least as many client updates per second as a synchronous 1,000-client round.
The workload is the engine benchmark's (``benchmarks/engine_benchmarks.py``: MLP 1024->64->2
on hashed Rotten Tomatoes, IID, one local step of batch 8, AdamW), in fedtune's own engine:

- ``sync``: every client every round, no devices;
- ``sync+devices``: the same with ``devices.profile = lognormal`` (always available, so the
  same clients train; the clock times, orders and records them);
- ``fedbuff K=n/10``: ``strategy.name = fedbuff``, ``concurrency`` = the clients, a buffer of a
  tenth of them (ten server updates, each followed by the server's evaluation of the global
  model, per thousand client updates);
- ``fedbuff K=n``: the same with a buffer of all of them (one server update and one evaluation
  per n client updates, as a synchronous round has: the event loop's own cost).

Every side is a ``fedtune run`` child process; sides alternate (A B C A B C ...); the first
round of every run (lazy imports, warm-up) is left out; the table gives medians of wall
seconds per round and client updates per wall second (``clients_ok / wall_s`` of metrics.csv).

    python benchmarks/virtual_clock.py                       # 1,000 clients, in process
    python benchmarks/virtual_clock.py --clients 50 --rounds 3 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOAD = [
    "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=1024",
    "model.hidden_sizes=[64]", "model.dropout=0", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.optimizer=adamw", "client.lr=0.1", "strategy.fraction_evaluate=0",
    "strategy.fraction_train=1.0", "run.checkpoint_every=0",
]


def sides(clients: int) -> dict[str, list[str]]:
    return {
        "sync": [],
        "sync+devices": ["devices.profile=lognormal"],
        "fedbuff K=n/10": ["strategy.name=fedbuff", "devices.profile=lognormal",
                           f"strategy.concurrency={clients}",
                           f"strategy.fedbuff_buffer_size={max(1, clients // 10)}"],
        # one server update (and one evaluation of the global model) per n client updates,
        # as a synchronous round has: what the loop itself costs
        "fedbuff K=n": ["strategy.name=fedbuff", "devices.profile=lognormal",
                        f"strategy.concurrency={clients}",
                        f"strategy.fedbuff_buffer_size={clients}"],
    }


def run_side(overrides: list[str], out: Path) -> list[dict[str, str]]:
    """One ``fedtune run``; its metrics.csv rows after the first."""
    fedtune = Path(sys.executable).with_name("fedtune")
    command = [str(fedtune), "run", "--output", str(out)]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, capture_output=True)
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6,
                        help="synchronous rounds; FedBuff makes 10x as many server updates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inprocess", choices=("inprocess", "ray"))
    args = parser.parse_args()
    base = [*WORKLOAD, f"data.num_clients={args.clients}", f"engine.backend={args.backend}"]
    wall: dict[str, list[float]] = {}
    rate: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name, extra in sides(args.clients).items():
                rounds = args.rounds * (10 if name == "fedbuff K=n/10" else 1)
                rows = run_side([*base, *extra, f"run.rounds={rounds}"],
                                Path(folder) / f"{name}-{repeat}")
                wall.setdefault(name, []).extend(float(r["wall_s"]) for r in rows)
                rate.setdefault(name, []).append(
                    sum(int(r["clients_ok"]) for r in rows) / sum(float(r["wall_s"]) for r in rows))
    sync_wall = statistics.median(wall["sync"])
    print(f"{args.clients:,} clients, {args.backend}, {args.repeats} repeats")
    print("| side | wall s per round (median) | vs sync | client updates per s | vs sync |")
    print("|---|---|---|---|---|")
    for name in wall:
        per_round = statistics.median(wall[name])
        updates = statistics.median(rate[name])
        print(f"| {name} | {per_round:.3f} | {per_round / sync_wall:.2f}x | {updates:,.0f} | "
              f"{updates / statistics.median(rate['sync']):.2f}x |")


if __name__ == "__main__":
    main()
