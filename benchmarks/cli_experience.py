"""What a user waits for: time to the CLI's first line, and in-process runs with torch's
threads limited to engine.client_cpus against torch's default (a thread per core).

Both sides of each comparison run as fresh ``fedtune run`` processes of this Python, one
after the other, alternating A B A B; the script prints medians of wall time and of the
child processes' CPU seconds (user + system).

- first output: seconds from starting ``fedtune run simulations/mlp_digits.toml`` to its first
  line on stdout (the process is stopped then);
- threads: ``simulations/mlp_digits.toml`` for ``--rounds`` rounds in process, with
  ``engine.client_cpus = 1`` (one torch thread, fedtune's default) against ``engine.client_cpus
  = <cores>``, which gives torch its own default of one thread per core, as in-process runs
  had before they followed engine.client_cpus. The difference shows on a busy machine, where
  idle threads spin against other processes.

    flock /tmp/fedtune-heavy.lock python benchmarks/cli_experience.py --pairs 3
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "simulations" / "mlp_digits.toml"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_output(folder: Path) -> tuple[float, float]:
    """Seconds to the first stdout line of ``fedtune run``, and the CPU seconds it used."""
    cpu = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(CONFIG),
                                "--output", str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    process.stdout.readline()
    waited = time.perf_counter() - started
    process.kill()
    process.wait()
    return waited, _children_cpu() - cpu


def run_rounds(folder: Path, rounds: int, cpus: int) -> tuple[float, float, float]:
    """Wall and CPU seconds of an in-process run of ``rounds`` rounds (the whole process), and
    the seconds of its rounds alone (metrics.csv's wall_s)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtune", "run", str(CONFIG), "--quiet",
                    "--output", str(folder), "--set", f"run.rounds={rounds}",
                    "--set", "engine.backend=inprocess", "--set", f"engine.client_cpus={cpus}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, used = time.perf_counter() - started, _children_cpu() - cpu
    with (folder / "metrics.csv").open(newline="") as handle:
        rounds_s = sum(float(row["wall_s"]) for row in csv.DictReader(handle))
    return wall, used, rounds_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs per comparison")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        folder = Path(tmp)
        firsts = [first_output(folder / f"first-{i}") for i in range(args.pairs)]
        sides: dict[int, list[tuple[float, float, float]]] = {1: [], cores: []}
        for pair in range(args.pairs):
            for cpus in (1, cores):
                sides[cpus].append(run_rounds(folder / f"run-{pair}-{cpus}", args.rounds,
                                              cpus))
    print(f"machine: {cores} cores; python {sys.version.split()[0]}; {args.pairs} runs per "
          "side, medians")
    print(f"first line of `fedtune run {CONFIG.relative_to(REPO)}`: "
          f"{statistics.median(w for w, _ in firsts):.2f} s wall, "
          f"{statistics.median(c for _, c in firsts):.2f} CPU s")
    print(f"{args.rounds} rounds in process; wall and CPU s of the whole process, rounds s = "
          "metrics.csv wall_s summed")
    print(f"{'torch threads':>16} {'wall s':>7} {'CPU s':>6} {'rounds s':>9}   "
          "rounds s of each run")
    for cpus, runs in sides.items():
        label = f"{cpus} (client_cpus)" if cpus == 1 else f"{cpus} (default)"
        print(f"{label:>16} {statistics.median(r[0] for r in runs):7.1f} "
              f"{statistics.median(r[1] for r in runs):6.1f} "
              f"{statistics.median(r[2] for r in runs):9.1f}   "
              + ", ".join(f"{r[2]:.1f}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
