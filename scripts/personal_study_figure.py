"""The personalisation study's figure: every client's accuracy on its local test split under
each algorithm (its own model: personalised, or the global one for FedAvg) and trained alone,
one panel per Dirichlet alpha, the three seeds' clients pooled (a box per algorithm: median,
quartiles, whiskers at 1.5 IQR; the diamond is the mean).

    python scripts/personal_study_figure.py sweeps/personalisation-digits \\
        docs/figures/personalisation_digits.png
"""

from __future__ import annotations

import csv
import sys
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["fedavg", "fedavg+ft", "fedper", "fedrep", "fedbabu", "ditto", "apfl"]


def own_accuracies(run: Path) -> tuple[list[float], list[float]]:
    """The last evaluation's accuracies of each client's own model, and trained alone."""
    with (run / "personal.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = max(int(r["round"]) for r in rows)
    rows = [r for r in rows if int(r["round"]) == last and r["accuracy"]]
    own = "personalised" if any(r["model"] == "personalised" for r in rows) else "global"
    return ([float(r["accuracy"]) for r in rows if r["model"] == own],
            [float(r["accuracy"]) for r in rows if r["model"] == "local_only"])


def main(sweep: Path, out: Path) -> None:
    groups: dict[float, dict[str, list[float]]] = {}
    order: list[str] = []
    for run in sorted((sweep / "runs").iterdir()):
        if not (run / "summary.json").is_file():  # unfinished
            continue
        config = tomllib.loads((run / "config.toml").read_text())
        alpha, name = config["data"]["alpha"], run.name.split("_alpha=")[0].split("=", 1)[1]
        own, alone = own_accuracies(run)
        panel = groups.setdefault(alpha, {})
        panel.setdefault(name, []).extend(own)
        if name == ORDER[0]:  # training alone is the same in every run of a seed
            panel.setdefault("local only", []).extend(alone)
        if name not in order:
            order.append(name)
    order = sorted(order, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    order.append("local only")
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), sharey=True)
    for ax, (alpha, panel) in zip(axes, sorted(groups.items()), strict=True):
        data = [panel.get(name, []) for name in order]
        ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markersize": 4})
        ax.set_xticks(range(1, len(order) + 1), order, rotation=30, ha="right")
        ax.set_title(f"Dirichlet alpha = {alpha:g}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("client accuracy on its local test split")
    fig.suptitle("digits, MLP, 10 clients x 3 seeds: each client's own model", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
