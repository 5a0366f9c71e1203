"""The run's figures: whole rounds on the axis, titles, the majority-class line, a partitions
legend beside the bars."""

from __future__ import annotations

import numpy as np

from fedtune.results.plots import accuracy_loss_figure, partitions_figure

ROWS = [{"round": str(r), "eval_accuracy": str(0.5 + r / 20), "eval_macro_f1": "0.5",
         "train_loss": "0.7", "eval_loss": "0.6", "federated_eval_accuracy": ""}
        for r in (1, 2, 3)]


def test_accuracy_figure_has_whole_rounds_titles_and_the_majority_line():
    fig = accuracy_loss_figure(ROWS, majority=0.573, title="quickstart: 8 clients")
    fig.canvas.draw()
    acc_ax, loss_ax = fig.axes
    for ax in (acc_ax, loss_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert ax.get_title()
    assert fig.get_suptitle() == "quickstart: 8 clients"
    majority = [line for line in acc_ax.get_lines() if line.get_label().startswith("majority")]
    assert len(majority) == 1 and set(majority[0].get_ydata()) == {0.573}


def test_partitions_legend_covers_no_bar():
    histogram = np.array([[90, 10], [5, 95], [50, 50], [100, 0]])  # tall bars to the top
    fig = partitions_figure(histogram, ["fresh", "rotten"])
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    assert len(bars) == 8
    assert not any(legend.overlaps(bar) for bar in bars)
    assert "4 clients" in ax.get_title()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)
