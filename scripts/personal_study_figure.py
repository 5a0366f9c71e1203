"""The personalisation study's figure: every client's accuracy on its local test split under
each algorithm (its own model: personalised, or the global one for FedAvg) and trained alone,
one panel per Dirichlet alpha (one panel for a natural partition), the seeds' clients pooled
(a box per algorithm: median, quartiles, whiskers at 1.5 IQR; the diamond is the mean).
Training alone comes from the FedAvg runs (the study's sweeps train it there only).

    python scripts/personal_study_figure.py sweeps/personalisation-digits \\
        docs/figures/personalisation_digits.png "digits, MLP, 10 clients x 3 seeds"
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).parent))
from personal_study_table import ORDER, REFERENCE, run_results


def main(sweep: Path, out: Path, title: str) -> None:
    groups: dict[object, dict[str, list[float]]] = {}
    for r in run_results(sweep):
        panel = groups.setdefault(r["cell"], {})
        panel.setdefault(r["algorithm"], []).extend(r["own"].values())
        if r["algorithm"] == REFERENCE:
            panel.setdefault("local only", []).extend(r["local_only"].values())
    names = {n for panel in groups.values() for n in panel}
    order = [n for n in ORDER if n in names] + ["local only"]
    cells = sorted(groups, key=lambda c: (c == "-", c if c != "-" else 0))
    fig, axes = plt.subplots(1, len(cells), figsize=(max(6.5, 0.8 * len(order)) * len(cells),
                                                     4.2), sharey=True, squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        data = [groups[cell].get(name, []) for name in order]
        ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markersize": 4})
        ax.set_xticks(range(1, len(order) + 1), order, rotation=30, ha="right")
        ax.set_title(f"Dirichlet alpha = {cell:g}" if cell != "-" else "natural partition")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("client accuracy on its local test split")
    fig.suptitle(f"{title}: each client's own model", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
