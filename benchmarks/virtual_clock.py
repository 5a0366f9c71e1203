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
  model - the default ``strategy.eval_every = 1`` - per n client updates);
- ``fedbuff K=n/10 eval_every=10``: the same evaluating the global model after every tenth
  server update: one evaluation per n client updates, the synchronous round's cadence;
- ``fedbuff K=n``: the same with a buffer of all of them (one server update and one evaluation
  per n client updates, as a synchronous round has: the event loop's own cost).

Every side is a ``fedtune run`` child process; sides alternate (A B C A B C ...); the first
round of every run (lazy imports, warm-up) is left out; the table gives each side's evaluation
cadence (global evaluations per n client updates) and medians (min-max) of
wall seconds per round and client updates per wall second (``clients_ok / wall_s`` of
metrics.csv), and each side's whole process tree's CPU-seconds per client update (children's
``getrusage``, start-up included: Ray's workers are children too), with the load average at
the start and the end (the machine is shared).

    python benchmarks/virtual_clock.py                       # 1,000 clients, in process
    python benchmarks/virtual_clock.py --clients 50 --rounds 3 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
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


def sides(clients: int) -> dict[str, tuple[list[str], int, int]]:
    """Each side's overrides, its server updates per synchronous round and the global
    evaluations it makes per ``clients`` client updates (the evaluation cadence)."""
    tenth = max(1, clients // 10)
    fedbuff = ["strategy.name=fedbuff", "devices.profile=lognormal",
               f"strategy.concurrency={clients}"]
    return {
        "sync": ([], 1, 1),
        "sync+devices": (["devices.profile=lognormal"], 1, 1),
        # an evaluation after every server update (the default): ten per n client updates
        "fedbuff K=n/10": ([*fedbuff, f"strategy.fedbuff_buffer_size={tenth}"], 10, 10),
        # an evaluation every tenth server update: one per n client updates, as the round
        "fedbuff K=n/10 eval_every=10": ([*fedbuff, f"strategy.fedbuff_buffer_size={tenth}",
                                          "strategy.eval_every=10"], 10, 1),
        # one server update (and one evaluation) per n client updates, as a synchronous
        # round has: what the loop itself costs
        "fedbuff K=n": ([*fedbuff, f"strategy.fedbuff_buffer_size={clients}"], 1, 1),
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_side(overrides: list[str], out: Path) -> tuple[list[dict[str, str]], float, int]:
    """One ``fedtune run``: its metrics.csv rows after the first, the CPU-seconds of its
    process tree and its client updates (every round)."""
    fedtune = Path(sys.executable).with_name("fedtune")
    command = [str(fedtune), "run", "--output", str(out)]
    for override in overrides:
        command += ["--set", override]
    before = _children_cpu_s()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)}\nexited with {done.returncode}:\n"
                         f"{done.stderr[-3000:]}{done.stdout[-2000:]}")
    cpu = _children_cpu_s() - before
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[1:], cpu, sum(int(r["clients_ok"]) for r in rows)


def _spread(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


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
    cpu: dict[str, list[float]] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name, (extra, per_round, _) in sides(args.clients).items():
                rounds = args.rounds * per_round
                rows, seconds, updates = run_side([*base, *extra, f"run.rounds={rounds}"],
                                                  Path(folder) / f"{name}-{repeat}")
                wall.setdefault(name, []).extend(float(r["wall_s"]) for r in rows)
                rate.setdefault(name, []).append(
                    sum(int(r["clients_ok"]) for r in rows) / sum(float(r["wall_s"]) for r in rows))
                cpu.setdefault(name, []).append(1000 * seconds / updates)
    load_end = os.getloadavg()
    sync_rate = statistics.median(rate["sync"])
    print(f"{args.clients:,} clients, {args.backend}, {args.repeats} alternated repeats; load "
          f"average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    sync_cpu = statistics.median(cpu["sync"])
    cadence = {name: evaluations for name, (_, _, evaluations) in sides(args.clients).items()}
    print(f"| side | global evaluations per {args.clients:,} client updates | wall s per round "
          "(FedBuff K=n/10: per server update), median (min-max) | client updates per wall s, "
          "median (min-max) | vs sync | process tree CPU-ms per client update, median "
          "(min-max) | CPU vs sync |")
    print("|---|---|---|---|---|---|---|")
    for name, walls in wall.items():
        updates = statistics.median(rate[name])
        print(f"| {name} | {cadence[name]} | {_spread(walls, 3)} | "
              f"{_spread(rate[name], 0)} | {updates / sync_rate:.2f}x | "
              f"{_spread(cpu[name], 2)} | {statistics.median(cpu[name]) / sync_cpu:.2f}x |")

if __name__ == "__main__":
    main()
