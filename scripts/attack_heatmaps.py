"""Heatmaps of the attack x defence study (simulations/attacks_digits.toml) from its sweep's
results.csv: mean final accuracy over seeds per (attack, defence), one panel per partition,
and the backdoor's attack success rate; and the same numbers as Markdown tables.

    python scripts/attack_heatmaps.py sweeps/attacks-digits    # -> docs/figures/attacks_*.png
    python scripts/attack_heatmaps.py sweeps/attacks-digits --seeds 0,1   # only these seeds
    python scripts/attack_heatmaps.py sweeps/attacks-text --prefix attacks_text  # text study
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def cells(rows: list[dict[str, str]], metric: str) -> dict[tuple[str, str, str], list[float]]:
    """(partition, attack, defence) -> the metric of each seed."""
    found: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row[metric] not in ("", None):
            found[row["partition"], row["attack"], row["defence"]].append(float(row[metric]))
    return found


def ordered(rows: list[dict[str, str]], key: str) -> list[str]:
    return list(dict.fromkeys(row[key] for row in rows))


def heatmap(rows: list[dict[str, str]], metric: str, attacks: list[str], title: str,
            path: Path) -> None:
    partitions, defences = ordered(rows, "partition"), ordered(rows, "defence")
    values = cells(rows, metric)
    figure, axes = plt.subplots(1, len(partitions), figsize=(5.5 * len(partitions),
                                                             0.45 * len(attacks) + 2.2))
    for index, (axis, partition) in enumerate(zip(list(getattr(axes, "flat", [axes])),
                                                  partitions, strict=True)):
        grid = [[statistics.mean(values[partition, a, d]) if values.get((partition, a, d))
                 else float("nan") for d in defences] for a in attacks]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn" if metric == "eval_accuracy"
                            else "RdYlGn_r", aspect="auto")
        axis.set_xticks(range(len(defences)), defences, rotation=45, ha="right")
        axis.set_yticks(range(len(attacks)), attacks if index == 0 else [])
        axis.set_title(f"{partition}")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(title)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def markdown(rows: list[dict[str, str]], metric: str, attacks: list[str]) -> str:
    """Mean ± std over seeds, one table per partition."""
    values = cells(rows, metric)
    defences = ordered(rows, "defence")
    out = []
    for partition in ordered(rows, "partition"):
        out += [f"{metric}, {partition}:", "",
                "| attack | " + " | ".join(defences) + " |",
                "|---|" + "---|" * len(defences)]
        for attack in attacks:
            line = []
            for defence in defences:
                seeds = values.get((partition, attack, defence), [])
                line.append(f"{statistics.mean(seeds):.2f} ± {statistics.pstdev(seeds):.2f}"
                            if seeds else "")
            out.append(f"| {attack} | " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory (with results.csv)")
    parser.add_argument("--seeds", default="", help="comma-separated run.seed values to use "
                                                    "(default: every seed in results.csv)")
    parser.add_argument("--prefix", default="attacks", help="figure names: <prefix>_accuracy.png, "
                                                             "<prefix>_backdoor_success.png")
    args = parser.parse_args()
    with (args.sweep / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if args.seeds:
        rows = [row for row in rows if row["run.seed"] in args.seeds.split(",")]
    attacks = ordered(rows, "attack")
    heatmap(rows, "eval_accuracy", attacks, "final global test accuracy (mean over seeds)",
            FIGURES / f"{args.prefix}_accuracy.png")
    backdoors = [a for a in attacks if any(r["attack"] == a and r["attack_success_rate"]
                                           for r in rows)]
    if backdoors:
        heatmap(rows, "attack_success_rate", backdoors, "backdoor attack success rate",
                FIGURES / f"{args.prefix}_backdoor_success.png")
    for metric, chosen in (("eval_accuracy", attacks), ("attack_success_rate", backdoors),
                           ("malicious_filtered", attacks[1:]),
                           ("benign_filtered", attacks[1:])):
        print(markdown(rows, metric, chosen))


if __name__ == "__main__":
    main()
