"""Time to accuracy of a devices sweep (``simulations/devices_async.toml``): per run, the
virtual hours and the client updates until the global test accuracy first reaches a target;
per method, the mean over seeds; a figure of accuracy against virtual hours.

Client updates are the updates the server used (clients.csv ``ok`` rows); "work" adds the
stragglers a synchronous round dropped (their devices trained in vain, had the round let them).

    python scripts/devices_async_table.py sweeps/devices-async --target 0.85
    python scripts/devices_async_table.py sweeps/devices-async-text \
        --target "Rotten Tomatoes by movie=0.72" --target "BBC News Dirichlet(0.5)=0.9" \
        --centralized sweeps/devices-async-text-central/*
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def time_to_target(run: Path, target: float) -> dict[str, float | None]:
    """Virtual hours, client updates and client work until accuracy first >= ``target``."""
    metrics, clients = _rows(run / "metrics.csv"), _rows(run / "clients.csv")
    reached = next((int(m["round"]) for m in metrics if float(m["eval_accuracy"]) >= target),
                   None)
    last = reached if reached is not None else int(metrics[-1]["round"])
    upto = [c for c in clients if int(c["round"]) <= last]
    hours = float(metrics[last - 1]["virtual_time_s"]) / 3600
    return {"hours": hours if reached else None,
            "updates": sum(c["status"] == "ok" for c in upto) if reached else None,
            "work": sum(c["status"] in ("ok", "straggler") for c in upto) if reached else None,
            "final": float(metrics[-1]["eval_accuracy"]),
            "total_hours": float(metrics[-1]["virtual_time_s"]) / 3600}


def _mean(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.2f}" + (f" ± {statistics.stdev(got):.2f}"
                                            if len(got) > 1 else "")
    return text + (f" ({len(got)}/{len(values)} reached)" if len(got) < len(values) else "")


def _targets(given: list[str], groups: list[str]) -> dict[str, float]:
    """``--target 0.85`` for every group, or ``--target "NAME=0.85"`` per group."""
    targets: dict[str, float] = {}
    for item in given:
        name, _, value = item.rpartition("=")
        for group in groups if not name else [name]:
            targets[group] = float(value)
    return targets


def _dataset(run: Path) -> str:
    return tomllib.loads((run / "config.toml").read_text())["data"]["dataset"]


def _centralized(paths: list[Path]) -> dict[str, list[float]]:
    """Final global test accuracy of centralized reference runs, by data.dataset."""
    found: dict[str, list[float]] = {}
    for path in paths:
        found.setdefault(_dataset(path), []).append(
            float(_rows(path / "metrics.csv")[-1]["eval_accuracy"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--target", action="append", default=[],
                        help="accuracy target: 0.85, or 'DATASET NAME=0.85' per grid dataset")
    parser.add_argument("--centralized", type=Path, nargs="*", default=[],
                        help="centralized reference runs (their final accuracy, by dataset)")
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[Path]]] = {}
    for row in _rows(args.sweep / "results.csv"):
        group = row.get("dataset", "")
        runs.setdefault(group, {}).setdefault(row["method"], []).append(Path(row["run_dir"]))
    targets = _targets(args.target or ["0.85"], list(runs))
    references = _centralized(args.centralized)
    figure, all_axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4), squeeze=False)
    for (group, methods), axes in zip(runs.items(), all_axes[0], strict=True):
        target = targets[group]
        print(f"\n{group or 'runs'}: target global test accuracy >= {target:g}")
        print("| method | virtual hours to target | client updates to target | client work "
              "to target | final accuracy | virtual hours in all |")
        print("|---|---|---|---|---|---|")
        for method, paths in methods.items():
            results = [time_to_target(p, target) for p in paths]
            print(f"| {method} | {_mean([r['hours'] for r in results])} | "
                  f"{_mean([r['updates'] for r in results])} | "
                  f"{_mean([r['work'] for r in results])} | "
                  f"{_mean([r['final'] for r in results])} | "
                  f"{_mean([r['total_hours'] for r in results])} |")
            for index, path in enumerate(paths):
                metrics = _rows(path / "metrics.csv")
                axes.plot([float(m["virtual_time_s"]) / 3600 for m in metrics],
                          [float(m["eval_accuracy"]) for m in metrics], linewidth=1,
                          color=f"C{list(methods).index(method)}",
                          label=method if index == 0 else None)
        reference = references.get(_dataset(next(iter(methods.values()))[0]))
        if reference:
            print(f"| centralized reference | | | | {_mean(reference)} | |")
            axes.axhline(statistics.mean(reference), color="black", linewidth=1,
                         label="centralized")
        axes.axhline(target, color="grey", linestyle=":", linewidth=1)
        axes.set_xscale("log")
        axes.set_title(group)
        axes.set_xlabel("virtual hours (log scale)")
        axes.set_ylabel("global test accuracy")
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.figure or args.sweep / "time_to_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
