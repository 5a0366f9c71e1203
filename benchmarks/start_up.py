"""What a short run costs from the command line to its exit, on two source trees, alternated.

Each side is the ``fedtune run`` script (its own process, as a user starts it) with
``PYTHONPATH`` set to one tree, on the engine benchmark's MLP workload
(``engine_benchmarks.MLP``) for ``--rounds`` rounds (default 1: start-up, one round, the
results and the exit), or on a simulation file (``--config``). The trees alternate, A B A B,
``--pairs`` times; per side the medians (min-max) of the wall seconds and the process's CPU
seconds (user + system, ``RUSAGE_CHILDREN``), with the load average before and after.

    python benchmarks/start_up.py /tmp/tree-before /tmp/tree-after --pairs 3
    python benchmarks/start_up.py A B --config simulations/quickstart.toml --pairs 2
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_benchmarks import MLP


def one_run(tree: Path, command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``command`` run with ``tree`` first on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="source tree A")
    parser.add_argument("after", type=Path, help="source tree B")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--config", type=Path, help="a simulation file instead of the MLP")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: must be at least 1")
    workload = [str(args.config)] if args.config else [
        *(f"--set={override}" for override in MLP),
        f"--set=data.num_clients={args.clients}", f"--set=run.rounds={args.rounds}"]
    # the installed script, whose sys.path puts PYTHONPATH first (``python -m`` from a
    # checkout would import the checkout's fedtune on both sides)
    script = Path(sys.executable).with_name("fedtune")
    load = os.getloadavg()[0]
    seconds: dict[Path, list[tuple[float, float]]] = {args.before: [], args.after: []}
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            for tree in (args.before, args.after):
                out = Path(scratch) / f"{tree.name}-{pair}"
                command = [str(script), "run", *workload, "--quiet", "--output", str(out)]
                seconds[tree].append(one_run(tree, command))
                print(f"pair {pair + 1}, {tree}: {seconds[tree][-1][0]:.2f} s wall, "
                      f"{seconds[tree][-1][1]:.2f} CPU-s", flush=True)
    print(f"\n{' '.join(sys.argv)}\nload average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {args.pairs} alternated pairs\n")
    print("| tree | wall s | CPU-s | CPU vs A |\n|---|---|---|---|")
    base = statistics.median(cpu for _, cpu in seconds[args.before])
    for tree, runs in seconds.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"| {tree} | {_spread(walls)} | {_spread(cpus)} | "
              f"{statistics.median(cpus) / base:.2f}x |")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
