"""The engine benchmark's MLP workload on two source trees, alternated (A B A B ...).

Each side is ``engine_benchmarks.py``'s fedtune side (a child process: its whole process tree's
CPU seconds and wall time per round, rounds 2.. kept) with ``PYTHONPATH`` set to one tree, so a
change is measured against the code before it under the same load. Prints the load average
before and after and, per side, the medians with their min-max and CPU-ms per client-round.

With ``--floor`` every repeat also runs the batched floor (``engine_benchmarks.py``'s floor
side, tree B) right after its sides, and each side's CPU-ms per client-round is read against
it: × the floor of all repeats' medians, and the median (min-max) of each repeat's own ratio
(its rounds' median over the floor measured beside them). The floor moves with the machine's
load as much as the sides do (0.23-0.30 CPU-ms in three runs one after another), so a ratio
against a floor measured minutes later mixes two loads.

    python benchmarks/compare_trees.py /work/main . --sizes 1000 --repeats 2 \\
        --side "ray=engine.backend=ray,engine.vectorise_clients=true" --floor
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_benchmarks as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="source tree A (its fedtune package is imported)")
    parser.add_argument("after", help="source tree B")
    parser.add_argument("--sizes", default="1000")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--side", action="append", required=True,
                        help="name=override,override,... (both trees run every side)")
    parser.add_argument("--floor", action="store_true",
                        help="run the batched floor after every repeat's sides; print ratios")
    args = parser.parse_args()
    sides = {}
    for side in args.side:
        name, _, overrides = side.partition("=")
        sides[name] = overrides.split(",") if overrides else []
    trees = {"A": str(Path(args.before).resolve()), "B": str(Path(args.after).resolve())}
    print(f"load average before: {bench.load_average()}")
    print("| clients | side | tree | s/round (min-max) | CPU-s/round (min-max) | "
          "CPU-ms per client-round |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for n in [int(x) for x in args.sizes.split(",")]:
            base, label = bench.workload(bench.MLP, n)
            rows: dict[tuple[str, str], list[dict]] = {}
            # CPU-ms per client-round, each repeat: (the median round, the mean round)
            per_repeat: dict[tuple[str, str], list[tuple[float, float]]] = {}
            floors: list[float] = []  # each repeat's batched floor, CPU-ms per client-round
            for repeat in range(args.repeats):
                for name, overrides in sides.items():
                    for tree, path in trees.items():
                        os.environ["PYTHONPATH"] = path
                        out = Path(folder) / f"{name}-{tree}-{n}-{repeat}"
                        lines, _ = bench.run_side(bench.fedtune_command(
                            [*base, f"data.num_clients={n}", f"run.rounds={args.rounds}",
                             *overrides], out))
                        kept = bench.steady(lines)
                        rows.setdefault((name, tree), []).extend(kept)
                        cpus = [r["cpu_s"] for r in kept]
                        per_repeat.setdefault((name, tree), []).append(
                            (1000 * statistics.median(cpus) / n, 1000 * statistics.mean(cpus) / n))
                if args.floor:
                    os.environ["PYTHONPATH"] = trees["B"]
                    floors.append(statistics.median(bench.batched_floor_ms(bench.floor_lines(n))))
            for (name, tree), measured in rows.items():
                cpu = statistics.median(r["cpu_s"] for r in measured)
                print(f"| {label} | {name} | {tree} | {bench._spread(measured, 'wall_s')} | "
                      f"{bench._spread(measured, 'cpu_s')} | {1000 * cpu / n:.3f} |",
                      flush=True)
            if floors:
                _print_ratios(label, per_repeat, floors)
    print(f"load average after: {bench.load_average()}")


def _print_ratios(label: str, per_repeat: dict[tuple[str, str], list[tuple[float, float]]],
                  floors: list[float]) -> None:
    """Each side against the batched floor measured in the same repeats: by its rounds' median
    and, beside it, their mean (a mean counts the rare rounds a full garbage collection or
    the machine's load made slow; a median does not)."""
    floor = statistics.median(floors)
    print(f"\nbatched floor, CPU-ms per client-round, each repeat: "
          f"{' / '.join(f'{f:.3f}' for f in floors)} (median {floor:.3f})")
    print("| clients | side | tree | CPU-ms per client-round, median round of each repeat | "
          "x median floor | x its own repeat's floor: median (min-max) | the same by the mean "
          "round |")
    print("|---|---|---|---|---|---|---|")
    for (name, tree), values in per_repeat.items():
        medians = [median for median, _ in values]
        by_median = [v / f for v, f in zip(medians, floors, strict=True)]
        by_mean = [mean / f for (_, mean), f in zip(values, floors, strict=True)]
        print(f"| {label} | {name} | {tree} | {' / '.join(f'{v:.3f}' for v in medians)} | "
              f"{statistics.median(medians) / floor:.2f} | {_ratio(by_median)} | "
              f"{_ratio(by_mean)} |", flush=True)


def _ratio(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    main()
