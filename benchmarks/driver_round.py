"""The driver's CPU per round, part by part, on two source trees alternated (A B A B ...).

Each side runs ``fedtune run`` on the engine benchmark's MLP workload (``engine_benchmarks.MLP``,
rounds 2.. kept) in a child process with ``PYTHONPATH`` set to one tree, and times the driver
process's parts with its CPU clock (every thread of the process: Ray's own threads in the
driver count where they run during a part): the engine's ``run_cohort`` (the clients' blocks,
dispatch and collect; in process the clients' training too), the strategy's
``configure_train`` / ``configure_evaluate`` (Flower's messages, one per client), the server's
evaluation of the new model, the strategy's aggregation, the clients.csv and metrics.csv rows
(built and written), and the rest of the round (what the driver does between these: the
phases' bookkeeping, the guard's checks, the listeners). Actors' processes are not counted
(``compare_trees.py`` measures the whole tree).

    python benchmarks/driver_round.py /work/main . --clients 1000 --backend ray
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_benchmarks import MLP, load_average

# part -> (module, owner attribute or "", function): the driver's calls, where the caller looks
# them up
PARTS: dict[str, tuple[str, str, str]] = {
    "engine: run_cohort": ("", "", ""),  # the grid's class, found at run time
    "strategy: configure (Flower's messages)": ("flwr.serverapp.strategy.fedavg", "FedAvg",
                                                "configure_train"),
    "strategy: configure evaluate": ("flwr.serverapp.strategy.fedavg", "FedAvg",
                                     "configure_evaluate"),
    "server evaluation": ("fedtune.server.round", "", "evaluate_global"),
    "aggregation (strategy, mean reply)": ("fedtune.server.round", "", "aggregate_train"),
    "clients.csv rows (built)": ("fedtune.server.phases", "TrainPhase", "rows"),
    "clients.csv and metrics.csv (written)": ("fedtune.results.run_dir", "RunDirectory",
                                              "append_round"),
}


def _timed(function, spent: dict[str, float], label: str, active: list[bool]):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            if active[0]:
                spent[label] += time.process_time() - start
    return timed


def side(clients: int, backend: str, rounds: int, out: str) -> None:
    """One run, its driver's parts timed; prints one JSON line."""
    import importlib

    from fedtune.config import load_config
    from fedtune.engine.launch import launch
    from fedtune.server.grid import CohortGrid

    spent: dict[str, float] = defaultdict(float)
    active = [False]
    for label, (module, owner, name) in PARTS.items():
        if not module:
            continue
        holder = importlib.import_module(module)
        holder = getattr(holder, owner) if owner else holder
        setattr(holder, name, _timed(getattr(holder, name), spent, label, active))
    importlib.import_module(f"fedtune.engine.{'ray_grid' if backend == 'ray' else 'inprocess'}")
    grids = [CohortGrid]
    while grids:  # every concrete CohortGrid: the engine's own run_cohort
        grid = grids.pop()
        grids.extend(grid.__subclasses__())
        if "run_cohort" in vars(grid) and not getattr(grid.run_cohort, "__isabstractmethod__",
                                                      False):
            grid.run_cohort = _timed(grid.run_cohort, spent, "engine: run_cohort", active)

    class Probe:
        """Starts the clocks as round 2 starts, reads them as the last round ends."""

        def __init__(self) -> None:
            self.began = self.thread = self.end = self.thread_end = 0.0

        def stage(self, text: str) -> None:
            pass

        def start(self, config, run_dir) -> None:
            pass

        def phase(self, server_round, phase, done, total) -> None:
            if server_round == 2 and not active[0] and not self.end:
                self.began, self.thread = time.process_time(), time.thread_time()
                active[0] = True

        def round_end(self, row) -> None:
            if row.round == rounds:
                self.end, self.thread_end = time.process_time(), time.thread_time()
                active[0] = False

        def finish(self, summary, run_dir) -> None:
            pass

    probe = Probe()
    config = load_config(None, [*MLP, f"data.num_clients={clients}", f"run.rounds={rounds}",
                                f"engine.backend={backend}"])
    config.run.dir = out
    launch(config, probe)
    kept = rounds - 1
    total = (probe.end - probe.began) / kept
    parts = {label: spent[label] / kept for label in PARTS}
    parts["rest of the round"] = total - sum(parts.values())
    print(json.dumps({"driver": total, "main_thread": (probe.thread_end - probe.thread) / kept,
                      "parts": parts}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", nargs="?", help="source tree A (its fedtune is imported)")
    parser.add_argument("after", nargs="?", help="source tree B")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--backend", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child: the run directory
    args = parser.parse_args()
    if args.side:
        side(args.clients, args.backend, args.rounds, args.side)
        return
    trees = {"A": str(Path(args.before).resolve()), "B": str(Path(args.after).resolve())}
    print(f"load average before: {load_average()}")
    measured: dict[str, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for tree, path in trees.items():
                out = Path(folder) / f"{tree}-{repeat}"
                command = [sys.executable, __file__, "--side", str(out), "--clients",
                           str(args.clients), "--backend", args.backend, "--rounds",
                           str(args.rounds)]
                result = subprocess.run(command, capture_output=True, text=True, check=True,
                                        env=dict(os.environ, PYTHONPATH=path,
                                                 HF_HUB_OFFLINE="1"))
                lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
                measured[tree].append(json.loads(lines[-1]))
    print(f"load average after: {load_average()}")
    n = args.clients

    def cell(values: list[float]) -> str:
        return (f"{1000 * statistics.median(values):.1f} ({1000 * min(values):.1f}-"
                f"{1000 * max(values):.1f}) = {1e6 * statistics.median(values) / n:.1f}")

    print(f"\nCPU-ms per round (min-max) = CPU-µs per client-round, {n:,} clients, "
          f"{args.backend}, rounds 2..{args.rounds}, {args.repeats} runs a tree")
    print("| part | A | B |\n|---|---|---|")
    for label in [*PARTS, "rest of the round"]:
        print(f"| {label} | " + " | ".join(
            cell([m["parts"][label] for m in measured[t]]) for t in trees) + " |")
    for key, label in (("driver", "driver process, all threads"),
                       ("main_thread", "driver's main thread")):
        print(f"| **{label}** | " + " | ".join(
            cell([m[key] for m in measured[t]]) for t in trees) + " |")


if __name__ == "__main__":
    main()
