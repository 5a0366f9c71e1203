"""Redraw a run's plots from its CSV files (``fedtune report RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.results.plots import plot_accuracy_loss, plot_partitions
from fedtune.results.run_dir import RunDirectory, read_csv


def redraw(path: Path) -> list[Path]:
    """Rewrite plots/accuracy_loss.png and plots/partitions.png; returns the files written."""
    run_dir = RunDirectory(path)
    run_dir.plots_dir.mkdir(exist_ok=True)
    written = [run_dir.plots_dir / "accuracy_loss.png"]
    plot_accuracy_loss(run_dir.metrics(), written[0])
    partitions = read_csv(path / "partitions.csv")
    if partitions:
        labels = [k for k in partitions[0] if k not in ("client_id", "total")]
        histogram = np.array([[int(row[k]) for k in labels] for row in partitions])
        written.append(run_dir.plots_dir / "partitions.png")
        plot_partitions(histogram, labels, written[-1])
    return written
