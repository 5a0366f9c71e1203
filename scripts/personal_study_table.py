"""The personalisation study's tables: for every algorithm and skew, each client's own model
(personalised, or the global one for FedAvg) on its local test split, mean and 10th percentile
(mean ± std over seeds), and the share of clients worse off than training alone.

Local-only (``run.local_reference``) is the same in every run of a seed and cell, so the study's
sweeps train it in the FedAvg run only, with the centralized reference (``run.reference``); this
script compares every run with the FedAvg run of its seed and cell. Each client's accuracy is the
last evaluation's (``personal.csv``); the distribution statistics are fedtune's own
(``fedtune.personal.stats``: numpy's linear 10th percentile, a client worse off when its accuracy
is strictly below).

    python scripts/personal_study_table.py sweeps/personalisation-digits
    python scripts/personal_study_table.py sweeps/personalisation-rotten-tomatoes

prints two Markdown tables (each client's own model on its local test split, one column group per
skew; the global model on the global test set beside the centralized reference) and writes them
to ``<sweep>/personal_table.md``.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedtune.personal.stats import GLOBAL, LOCAL_ONLY, PERSONALISED, distribution, share_worse

ORDER = ["fedavg", "fedavg+ft", "fedper", "fedrep", "fedbabu", "ditto", "apfl"]
NAMES = {"fedavg": "FedAvg (global model)", "fedavg+ft": "FedAvg + fine-tune",
         "fedper": "FedPer", "fedrep": "FedRep", "fedbabu": "FedBABU", "ditto": "Ditto",
         "apfl": "APFL", "local only": "local only",
         "centralized": "centralized (global test set)"}
REFERENCE = "fedavg"  # the run of a seed and cell that trains local-only and the centralized one


def client_accuracies(run: Path) -> dict[str, dict[int, float]]:
    """The last evaluation's accuracy of every client under every model of a run."""
    with (run / "personal.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = max(int(r["round"]) for r in rows)
    models: dict[str, dict[int, float]] = {}
    for r in rows:
        if int(r["round"]) == last and r["accuracy"]:
            models.setdefault(r["model"], {})[int(r["client_id"])] = float(r["accuracy"])
    return models


def run_results(sweep: Path) -> list[dict]:
    """One record per finished run: algorithm, cell (alpha or '-'), seed and its accuracies."""
    results = []
    for run in sorted((sweep / "runs").iterdir()):
        if not (run / "summary.json").is_file() or not (run / "personal.csv").is_file():
            continue  # unfinished, or a centralized run
        config = tomllib.loads((run / "config.toml").read_text())
        summary = json.loads((run / "summary.json").read_text())
        name = next(p.split("=", 1)[1] for p in run.name.split("_") if p.startswith("algorithm="))
        data = config["data"]
        cell = data["alpha"] if "dirichlet" in data["partitioner"] else "-"
        models = client_accuracies(run)
        own = models.get(PERSONALISED) or models[GLOBAL]
        results.append({"algorithm": name, "cell": cell, "seed": config["run"]["seed"],
                        "own": own, "local_only": models.get(LOCAL_ONLY, {}),
                        "eval_accuracy": summary["final"]["eval_accuracy"],
                        "centralized": summary.get("centralized_accuracy")})
    return results


def per_run_rows(results: list[dict]) -> list[dict]:
    """Every run's mean, p10 and share worse than alone; the local-only and centralized rows
    from the FedAvg runs."""
    reference = {(r["cell"], r["seed"]): r for r in results if r["algorithm"] == REFERENCE}
    rows = []
    for r in results:
        ref = reference.get((r["cell"], r["seed"]))
        alone = ref["local_only"] if ref else {}
        dist = distribution(list(r["own"].values()))
        rows.append({"algorithm": r["algorithm"], "cell": r["cell"], "seed": r["seed"],
                     "mean": dist["mean"], "p10": dist["p10"],
                     "worse": share_worse(r["own"], alone) if alone else None,
                     "clients": dist["clients"], "eval_accuracy": r["eval_accuracy"]})
        if r["algorithm"] == REFERENCE:
            dist = distribution(list(alone.values()))
            rows.append({"algorithm": "local only", "cell": r["cell"], "seed": r["seed"],
                         "mean": dist["mean"], "p10": dist["p10"], "worse": None,
                         "clients": dist["clients"], "eval_accuracy": None})
            rows.append({"algorithm": "centralized", "cell": r["cell"], "seed": r["seed"],
                         "mean": r["centralized"], "p10": None, "worse": None, "clients": 0,
                         "eval_accuracy": r["centralized"]})
    return rows


def _spread(values: list[float | None], percent: bool = False, signed: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale, digits = (100, 0) if percent else (1, 3)
    mean = statistics.fmean(values) * scale
    if percent:
        return f"{mean:.{digits}f}%"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _cells_and_names(rows: list[dict]) -> tuple[list, list[str]]:
    cells = sorted({r["cell"] for r in rows}, key=lambda c: (c == "-", c if c != "-" else 0))
    names = sorted({r["algorithm"] for r in rows},
                   key=lambda n: (ORDER + ["local only", "centralized"]).index(n))
    return cells, names


def _label(cell: Any) -> str:
    return f"α = {cell:g} " if cell != "-" else ""


def markdown(rows: list[dict]) -> str:
    """Rows: algorithms and local only; per cell: each client's own model's mean on the local
    test splits, its difference from FedAvg's in the same seed (paired: the seeds' partitions
    differ, so the pairs vary less than the means), the p10 (mean ± std over seeds), the share
    worse than alone (mean over seeds); the number of seeds."""
    rows = [r for r in rows if r["algorithm"] != "centralized"]
    cells, names = _cells_and_names(rows)
    base = {(r["cell"], r["seed"]): r["mean"] for r in rows if r["algorithm"] == REFERENCE}
    head = ["algorithm"]
    for c in cells:
        head += [f"{_label(c)}mean", f"{_label(c)}Δ mean", f"{_label(c)}p10",
                 f"{_label(c)}worse than alone"]
    head.append("seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        line, seeds = [NAMES.get(name, name)], set()
        for c in cells:
            mine = [r for r in rows if r["algorithm"] == name and r["cell"] == c]
            seeds |= {r["seed"] for r in mine}
            line += [_spread([r["mean"] for r in mine]),
                     _spread([r["mean"] - base[(c, r["seed"])] for r in mine
                              if name != REFERENCE and (c, r["seed"]) in base], signed=True),
                     _spread([r["p10"] for r in mine]),
                     _spread([r["worse"] for r in mine], percent=True)]
        line.append(str(len(seeds)))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def global_markdown(rows: list[dict]) -> str:
    """The global model's accuracy on the global test set (mean ± std over seeds), beside the
    centralized reference's (the same model and examples, the clients' data pooled)."""
    rows = [r for r in rows if r["algorithm"] != "local only"]
    cells, names = _cells_and_names(rows)
    head = ["algorithm"] + [f"{_label(c)}global test".strip() for c in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        line = [NAMES.get(name, name).replace(" (global model)", "")
                .replace(" (global test set)", "")]
        line += [_spread([r["eval_accuracy"] for r in rows
                          if r["algorithm"] == name and r["cell"] == c]) for c in cells]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def main(sweep: Path) -> None:
    rows = per_run_rows(run_results(sweep))
    text = markdown(rows) + "\n" + global_markdown(rows)
    (sweep / "personal_table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
