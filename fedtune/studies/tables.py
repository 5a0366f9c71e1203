"""The tables and curves of a sweep, from its runs' results (``fedtune.studies.sweep``).

``table.csv`` / ``table.md``: mean ± std of the sweep's metric over ``run.seed`` for every
other combination of grid values; ``table_wide.md``: one row per value of one grid key, one
column per combination of the others; round curves (mean ± std band over seeds) and each run's
accuracy against the round and the bytes sent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.results.run_dir import read_csv
from fedtune.studies.sweep import (
    CENTRAL_LABELS,
    SEED_KEY,
    TRAINING_KEY,
    SweepSpec,
    central_keys,
    expand,
    grid_keys,
    is_finished,
    needs_training_key,
    table_keys,
)


def group_rows(rows: list[dict[str, Any]], keys: list[str], metric: str
               ) -> list[dict[str, Any]]:
    """Mean, std and count of ``metric`` for every combination of ``keys`` (seeds pooled)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = tuple(json.dumps(row[k]) for k in keys)
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            groups.setdefault(key, []).append(float(value))
        else:
            groups.setdefault(key, [])
    table = []
    for key, values in groups.items():
        entry = {k: json.loads(v) for k, v in zip(keys, key, strict=True)}
        entry["mean"] = float(np.mean(values)) if values else None
        with np.errstate(invalid="ignore"):  # ε = inf in every seed: its spread is NaN
            entry["std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        entry["n"] = len(values)
        entry["values"] = values  # one per seed, in the grid's order
        table.append(entry)
    return table


def write_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """table.csv and table.md: mean ± std of the metric over seeds, per other grid values,
    then the mean of each of ``sweep.columns``, the mean ε spent where runs were private and
    the gap to the centralized reference where the sweep has one."""
    keys = [k for k in table_keys(spec) if k != SEED_KEY]
    table = group_rows(rows, keys, spec.metric)
    columns = list(spec.extra.get("columns", []))
    for column in columns:
        means = group_rows(rows, keys, column)
        for entry, extra in zip(table, means, strict=True):
            entry[column] = extra["mean"]
    if "examples" in spec.centralized:
        add_gaps(spec, table)
        columns.append("gap_to_centralized")
    if any(row.get("epsilon") is not None for row in rows):
        for entry, spent in zip(table, group_rows(rows, keys, "epsilon"), strict=True):
            entry["epsilon_spent"] = spent["mean"]
        columns.append("epsilon_spent")
    with (spec.directory / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*keys, "mean", "std", "n", "values",
                                                    *columns])
        writer.writeheader()
        writer.writerows({**entry, "values": json.dumps(entry["values"])} for entry in table)
    (spec.directory / "table.md").write_text(markdown_table(table, keys, spec.metric, columns),
                                             encoding="utf-8")
    return table


def central_kind(spec: SweepSpec, entry: dict[str, Any]) -> str:
    """The ``sweep.centralized`` kind of a row or table entry ("" for a federated one)."""
    labels = {label: kind for kind, label in CENTRAL_LABELS.items()}
    keys = [TRAINING_KEY] if needs_training_key(spec) else [
        k for k in grid_keys(spec) if k not in central_keys(spec)]
    return next((labels[entry[k]] for k in keys
                 if isinstance(entry.get(k), str) and entry[k] in labels), "")


def add_gaps(spec: SweepSpec, table: list[dict[str, Any]]) -> None:
    """``gap_to_centralized`` of every federated entry: the mean of the centralized
    ("examples") entry with the same values of the keys that change a centralized run, minus
    the entry's mean - how far short of pooling the data the federation falls."""
    kept = [k for k in central_keys(spec) if k != SEED_KEY]

    def signature(entry: dict[str, Any]) -> str:
        return json.dumps([entry.get(k) for k in kept])

    references = {signature(e): e["mean"] for e in table if central_kind(spec, e) == "examples"}
    for entry in table:
        reference = None if central_kind(spec, entry) else references.get(signature(entry))
        entry["gap_to_centralized"] = (None if reference is None or entry["mean"] is None
                                       else reference - entry["mean"])


def _cell(column: str, value: Any) -> str:
    """Bytes in MB, seconds whole, ε with three digits, gaps signed, scores with four
    decimals."""
    if value is None:
        return "-"
    if column == "gap_to_centralized":
        return f"{value:+.4f}"
    if "bytes" in column:
        return f"{value / 1e6:,.2f}"
    if column.endswith("_s"):
        return f"{value:.0f}"
    if column in ("epsilon_spent", "audit_epsilon", "audit_bound"):
        return f"{value:.3g}"
    return f"{value:.4f}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(table: list[dict[str, Any]], keys: list[str], metric: str,
                   columns: Sequence[str] = ()) -> str:
    names = {"epsilon_spent": "ε spent", "gap_to_centralized": "gap to centralized"}
    titles = [f"{c} (MB)" if "bytes" in c else names.get(c, c) for c in columns]
    header = [*keys, f"{metric} (mean ± std)", "per seed", "runs", *titles]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [_text(entry[k]) for k in keys]
        score = mean_and_spread(entry, 4)
        seeds = " / ".join(f"{v:.3f}" for v in entry.get("values", []))
        extra = [_cell(c, entry[c]) for c in columns]
        lines.append("| " + " | ".join([*cells, score, seeds or "-", str(entry["n"]), *extra])
                     + " |")
    return "\n".join(lines) + "\n"


def mean_and_spread(entry: dict[str, Any], digits: int) -> str:
    """"mean ± std" over seeds; one run has no spread to show, so only its value."""
    if entry["mean"] is None:
        return "-"
    if entry["n"] < 2:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def run_curves(spec: SweepSpec) -> list[tuple[str, list[dict[str, str]]]]:
    """(label, metrics.csv rows) of every finished run, labelled by its grid values (the seed
    only when the grid has several)."""
    several_seeds = len(spec.grid.get(SEED_KEY, [])) > 1
    curves = []
    for run in expand(spec):
        if not is_finished(Path(run.config.run.dir), run.config):
            continue
        rows = read_csv(Path(run.config.run.dir) / "metrics.csv")
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in run.values.items()
                         if k != SEED_KEY or several_seeds)
        curves.append((label, rows))
    return curves


def _other_keys(spec: SweepSpec, *exclude: str) -> list[str]:
    keys = [*spec.grid, *([TRAINING_KEY] if needs_training_key(spec) else [])]
    return [k for k in keys if k != SEED_KEY and k not in exclude]


def pivot_markdown(table: list[dict[str, Any]], row_key: str, column_keys: list[str],
                   metric: str) -> str:
    """Mean ± std of ``metric``: one row per value of ``row_key``, one column per combination
    of ``column_keys``."""
    def column_of(entry: dict[str, Any]) -> str:
        return ", ".join(f"{k.split('.')[-1]}={entry[k]}" for k in column_keys) or metric

    columns = list(dict.fromkeys(column_of(e) for e in table))
    row_values = list(dict.fromkeys(json.dumps(e[row_key]) for e in table))
    cells = {(json.dumps(e[row_key]), column_of(e)): e for e in table}
    lines = [f"| {row_key} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for value in row_values:
        texts = []
        for column in columns:
            entry = cells.get((value, column))
            texts.append("-" if entry is None else mean_and_spread(entry, 3))
        lines.append(f"| {json.loads(value)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def write_pivot(spec: SweepSpec, table: list[dict[str, Any]], row_key: str) -> Path:
    path = spec.directory / "table_wide.md"
    path.write_text(pivot_markdown(table, row_key, _other_keys(spec, row_key), spec.metric),
                    encoding="utf-8")
    return path


def round_curves(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-round mean and std of the metric over seeds (from each run's metrics.csv), for every
    combination of the other grid keys. Centralized runs to convergence count epochs, not
    rounds: theirs is a flat curve (``"flat": True``) at the mean of their final metric."""
    keys = _other_keys(spec)
    groups: dict[str, list[list[float]]] = {}
    flat: dict[str, list[float]] = {}
    for row in rows:
        group = json.dumps([row[k] for k in keys])
        if central_kind(spec, row) == "converged":
            flat.setdefault(group, []).append(row[spec.metric])
            continue
        metrics = read_csv(Path(row["run_dir"]) / "metrics.csv")
        values = [float(r[spec.metric]) if r.get(spec.metric) else math.nan for r in metrics]
        groups.setdefault(group, []).append(values)
    curves = []
    for key, finals in flat.items():
        entry = dict(zip(keys, json.loads(key), strict=True))
        entry.update(rounds=[], mean=[float(np.mean(finals))], flat=True, n=len(finals),
                     std=[float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0])
        curves.append(entry)
    for key, runs in groups.items():
        stacked = np.array(runs, dtype=float)  # runs of one group have the same rounds
        mean = np.nanmean(stacked, axis=0)
        spread = (np.nanstd(stacked, axis=0, ddof=1) if len(runs) > 1
                  else np.zeros(stacked.shape[1]))
        entry = dict(zip(keys, json.loads(key), strict=True))
        entry.update(rounds=list(range(1, stacked.shape[1] + 1)), mean=mean.tolist(),
                     std=spread.tolist(), n=len(runs))
        curves.append(entry)
    return curves


def write_outputs(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[Path]:
    """Everything a finished sweep writes from its rows: table.csv and table.md, then what
    the sweep file asks for (``x``: plot.png, ``rows``: table_wide.md, ``bytes_curves`` and
    ``curves``); returns table.md and the files after it."""
    from fedtune.results.plots import plot_curves, plot_round_curves, plot_sweep

    table = write_table(spec, rows)
    written = [spec.directory / "table.md"]
    x_key, series_key = spec.extra.get("x"), spec.extra.get("series")
    if x_key:
        written.append(spec.directory / "plot.png")
        keys = [key for key in grid_keys(spec) if key != SEED_KEY]
        plot_sweep(table, keys, x_key, series_key, spec.metric, written[-1])
    if spec.extra.get("rows"):
        written.append(write_pivot(spec, table, spec.extra["rows"]))
    if spec.extra.get("bytes_curves"):
        written.append(spec.directory / "bytes_curves.png")
        plot_curves(run_curves(spec), written[-1])
    if spec.extra.get("curves"):
        written.append(spec.directory / "curves.png")
        plot_round_curves(round_curves(spec, rows), spec.extra["curves"], spec.metric,
                          written[-1])
    return written
