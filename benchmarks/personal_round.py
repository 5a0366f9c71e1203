"""A personalised round against a FedAvg round at scale (issue 27: within 1.5x on the MLP).

Each side is ``fedtune run`` in a child process on the engine benchmark's MLP workload
(``engine_benchmarks.MLP``: 1024 hashed features of Rotten Tomatoes -> 64 -> 2, one local
AdamW step of batch 8, every client every round), ``--clients`` clients, ``--rounds`` rounds;
the round time is metrics.csv's ``wall_s`` (train, aggregate, the server's global test; the
personal evaluation of every client runs after it, once at the end, and is timed apart from
the end of the last round to the end of the run). Round 1 (imports, warm-up) is left out; the
table shows the median of the other rounds over ``--repeats`` runs, the sides alternating, and
the ratio to FedAvg on the same runtime. Beside it, each round's CPU-seconds in the driver
process (``time.process_time`` around ``fedtune.server.round.play_round``: train, aggregate, the
global test; rounds 2 on): in process every client trains there, so it is the round's whole CPU
cost and barely moves with the machine's load; on Ray the clients train in actors and it is
only the driver's share. Ditto and APFL do two models' work per step by design. Times need a quiet
machine:

    python benchmarks/personal_round.py --clients 1000 --rounds 4 --repeats 2 \\
        --runtimes inprocess,ray --strategies fedavg,finetune,fedbabu,fedper,fedrep,ditto,apfl
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_benchmarks import MLP  # noqa: E402 - the same workload as the engine's benchmark

FINE_TUNING = ("finetune", "fedbabu")  # their evaluation fine-tunes: one step is enough here
# the child: ``fedtune run`` with each round's CPU-seconds written to a JSON file at exit
CHILD = """
import atexit, json, sys, time
import fedtune.server.app as app
from fedtune.cli import main
play, spent, out = app.play_round, [], sys.argv.pop(1)
def timed(*args, **kwargs):
    started = time.process_time()
    try:
        return play(*args, **kwargs)
    finally:
        spent.append(time.process_time() - started)
app.play_round = timed
atexit.register(lambda: open(out, "w").write(json.dumps(spent)))
sys.exit(main(sys.argv[1:]))
"""


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(strategy: str, runtime: str, clients: int, rounds: int, folder: Path
            ) -> tuple[list[float], list[float], float, float, float]:
    """Round wall times of one run and its rounds' CPU-seconds in the driver (round 1
    left out of both), its whole time in summary.json, and the child process's wall and CPU
    seconds (its reaped process tree: Ray's workers included only as far as their parents reap
    them)."""
    out = folder / f"{strategy}-{runtime}"
    overrides = [*MLP, f"strategy.name={strategy}", f"engine.backend={runtime}",
                 f"data.num_clients={clients}", f"run.rounds={rounds}",
                 "data.local_test_fraction=0.2",
                 *(["strategy.finetune_steps=1"] if strategy in FINE_TUNING else [])]
    phases = folder / f"{strategy}-{runtime}.json"
    command = [sys.executable, "-c", CHILD, str(phases), "run", "--quiet", "--output", str(out)]
    for override in overrides:
        command += ["--set", override]
    cpu, wall = _children_cpu_s(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu, wall = _children_cpu_s() - cpu, time.perf_counter() - wall
    if done.returncode:
        sys.exit(f"{strategy} on {runtime}: rc {done.returncode}\n{done.stderr[-2000:]}")
    with (out / "metrics.csv").open(newline="") as handle:
        walls = [float(row["wall_s"]) for row in csv.DictReader(handle)][1:]
    total = json.loads((out / "summary.json").read_text())["total_time_s"]
    return walls, json.loads(phases.read_text())[1:], total, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runtimes", default="inprocess,ray")
    parser.add_argument("--strategies",
                        default="fedavg,finetune,fedbabu,fedper,fedrep,ditto,apfl")
    args = parser.parse_args()
    strategies, runtimes = args.strategies.split(","), args.runtimes.split(",")
    walls: dict[tuple[str, str], list[float]] = {}
    round_cpu: dict[tuple[str, str], list[float]] = {}
    totals: dict[tuple[str, str], list[float]] = {}
    processes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print("load average at start:", Path("/proc/loadavg").read_text().strip(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for runtime in runtimes:
                for strategy in strategies:
                    folder = Path(tmp) / str(repeat)
                    got, phases, total, wall, cpu = one_run(strategy, runtime, args.clients,
                                                            args.rounds, folder)
                    walls.setdefault((strategy, runtime), []).extend(got)
                    round_cpu.setdefault((strategy, runtime), []).extend(phases)
                    totals.setdefault((strategy, runtime), []).append(total)
                    processes.setdefault((strategy, runtime), []).append((wall, cpu))
                    print(f"[{repeat + 1}/{args.repeats}] {runtime} {strategy}: rounds "
                          + " ".join(f"{w:.2f}" for w in got) + "; round CPU-s "
                          + " ".join(f"{c:.2f}" for c in phases)
                          + f"; process {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    print("load average at end:", Path("/proc/loadavg").read_text().strip())
    print("\n| runtime | strategy | round s (median, min-max) | vs FedAvg | round CPU-s in "
          "the driver (median, min-max) | vs FedAvg | run s (rounds + end) "
          "| process wall s / CPU-s (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for runtime in runtimes:
        fedavg = ("fedavg", runtime)
        base = statistics.median(walls[fedavg]) if "fedavg" in strategies else None
        base_cpu = statistics.median(round_cpu[fedavg]) if "fedavg" in strategies else None
        for strategy in strategies:
            rounds = walls[(strategy, runtime)]
            median = statistics.median(rounds)
            ratio = f"{median / base:.2f}x" if base else "-"
            phases = round_cpu[(strategy, runtime)]
            median_cpu = statistics.median(phases)
            ratio_cpu = f"{median_cpu / base_cpu:.2f}x" if base_cpu else "-"
            wall = statistics.median(w for w, _ in processes[(strategy, runtime)])
            cpu = statistics.median(c for _, c in processes[(strategy, runtime)])
            print(f"| {runtime} | {strategy} | {median:.3f} ({min(rounds):.3f}-{max(rounds):.3f})"
                  f" | {ratio} | {median_cpu:.3f} ({min(phases):.3f}-{max(phases):.3f}) | "
                  f"{ratio_cpu} | {statistics.median(totals[(strategy, runtime)]):.1f} | "
                  f"{wall:.1f} / {cpu:.1f} |")


if __name__ == "__main__":
    main()
