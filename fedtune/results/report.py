"""Redraw a run's plots from its CSV files (``fedtune report RUN_DIR``)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from fedtune.config import from_dict
from fedtune.results.plots import (
    plot_accuracy_loss,
    plot_epsilon,
    plot_partitions,
    plot_personal,
)
from fedtune.results.run_dir import RunDirectory, read_csv
from fedtune.results.summary import privacy_setting, run_title
from fedtune.tables.privacy_modes import PRIVACY_MODES


def redraw(path: Path) -> list[Path]:
    """Rewrite plots/accuracy_loss.png, partitions.png, (with DP) epsilon.png and (with a
    personal evaluation) personal_accuracy.png; returns the files written."""
    run_dir = RunDirectory(path)
    run_dir.plots_dir.mkdir(exist_ok=True)
    written = [run_dir.plots_dir / "accuracy_loss.png"]
    config_file = path / "config.toml"
    privacy = (tomllib.loads(config_file.read_text(encoding="utf-8")).get("privacy", {})
               if config_file.is_file() else {})
    summary = run_dir.read_json("summary.json") if (path / "summary.json").is_file() else {}
    majority = summary.get("dataset", {}).get("majority_class_accuracy")
    config = (from_dict(tomllib.loads(config_file.read_text(encoding="utf-8")))
              if config_file.is_file() else None)
    title = run_title(config) if config is not None else ""
    plot_accuracy_loss(run_dir.metrics(), written[0], majority, title)
    if PRIVACY_MODES[privacy.get("mode", "none")].spends_budget:
        written.append(run_dir.plots_dir / "epsilon.png")
        plot_epsilon(run_dir.metrics(), float(privacy.get("target_epsilon", 0.0)), written[-1],
                     privacy_setting(config) if config is not None else "")
    partitions = read_csv(path / "partitions.csv")
    if partitions:
        labels = [k for k in partitions[0] if k not in ("client_id", "total")]
        histogram = np.array([[int(row[k]) for k in labels] for row in partitions])
        written.append(run_dir.plots_dir / "partitions.png")
        plot_partitions(histogram, labels, written[-1])
    personal = run_dir.personal()
    if personal:
        written.append(run_dir.plots_dir / "personal_accuracy.png")
        plot_personal(personal, written[-1], title)
    return written
