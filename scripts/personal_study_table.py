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

prints a Markdown table (one column pair per skew) and writes it to ``<sweep>/personal_table.md``.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tomllib
from pathlib import Path

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
        if not (run / "summary.json").is_file():  # unfinished
            continue
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


def _spread(values: list[float | None], percent: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale, digits = (100, 0) if percent else (1, 3)
    mean = statistics.fmean(values) * scale
    if percent:
        return f"{mean:.{digits}f}%"
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """Rows: algorithms; per cell: mean and p10 (mean ± std over seeds), share worse than alone
    (mean over seeds), and the number of seeds."""
    cells = sorted({r["cell"] for r in rows}, key=lambda c: (c == "-", c if c != "-" else 0))
    label = {c: (f"α = {c:g}" if c != "-" else "") for c in cells}
    names = sorted({r["algorithm"] for r in rows},
                   key=lambda n: (ORDER + ["local only", "centralized"]).index(n))
    head = ["algorithm"]
    for c in cells:
        head += [f"{label[c]} mean".strip(), f"{label[c]} p10".strip(),
                 f"{label[c]} worse than alone".strip()]
    head.append("seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        line, seeds = [NAMES.get(name, name)], set()
        for c in cells:
            mine = [r for r in rows if r["algorithm"] == name and r["cell"] == c]
            seeds |= {r["seed"] for r in mine}
            line += [_spread([r["mean"] for r in mine]), _spread([r["p10"] for r in mine]),
                     _spread([r["worse"] for r in mine], percent=True)]
        line.append(str(len(seeds)))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def main(sweep: Path) -> None:
    rows = per_run_rows(run_results(sweep))
    text = markdown(rows)
    (sweep / "personal_table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
