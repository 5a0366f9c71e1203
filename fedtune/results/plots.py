"""Figures of a run, drawn from its CSV files (so ``fedtune report`` can redraw them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])


def _whole_rounds(ax: Axes) -> None:
    """Rounds are integers: no tick at round 1.5."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_loss_figure(rows: list[dict[str, str]], majority: float | None = None,
                         title: str = "") -> Figure:
    """Global test accuracy / macro-F1 (and the majority-class accuracy to beat) and train /
    test loss against the round."""
    rounds = _column(rows, "round")
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(rounds, _column(rows, "eval_accuracy"), marker="o", label="global test accuracy")
    acc_ax.plot(rounds, _column(rows, "eval_macro_f1"), marker="s", label="global test macro-F1")
    federated = _column(rows, "federated_eval_accuracy")
    if np.isfinite(federated).any():
        acc_ax.plot(rounds, federated, marker="^", linestyle="--",
                    label="clients' local test accuracy")
    if majority is not None:
        acc_ax.axhline(majority, color="grey", linestyle=":",
                       label=f"majority class ({majority:.3f})")
    acc_ax.set_title("score on the held-out global test set")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("score")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    loss_ax.plot(rounds, _column(rows, "train_loss"), marker="o", label="train loss (clients)")
    loss_ax.plot(rounds, _column(rows, "eval_loss"), marker="s", label="global test loss")
    loss_ax.set_title("loss")
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    for ax in (acc_ax, loss_ax):
        _whole_rounds(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_accuracy_loss(rows: list[dict[str, str]], path: Path, majority: float | None = None,
                       title: str = "") -> None:
    """``accuracy_loss_figure`` as a PNG."""
    _save(accuracy_loss_figure(rows, majority, title), path)


def _save(fig: Figure, path: Path, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_epsilon(rows: list[dict[str, str]], target_epsilon: float, path: Path,
                 setting: str = "") -> None:
    """ε spent after every round (central: the run's, local: the largest client's);
    ``setting``: the privacy setting in words, for the title."""
    rounds = _column(rows, "round")
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in (("epsilon", "central ε (run)"),
                          ("max_client_epsilon", "local ε (largest client)")):
        values = _column(rows, column)
        if np.isfinite(values).any():
            ax.plot(rounds, values, marker="o", label=label)
        elif np.isinf(values).any():
            ax.text(0.5, 0.5, f"{label} = ∞ (clipping without noise)", ha="center",
                    transform=ax.transAxes)
    if 0 < target_epsilon < np.inf:
        ax.axhline(target_epsilon, color="grey", linestyle="--", label="target ε")
    ax.set_title(f"privacy spent ({setting})" if setting else "privacy spent")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _whole_rounds(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


MAX_BARS = 100  # clients drawn as bars; more are drawn as stacked areas (one shape per label)


def partitions_figure(histogram: np.ndarray, label_names: tuple[str, ...] | list[str]
                      ) -> Figure:
    """Examples of each label held by each client: stacked bars, or stacked areas for many
    clients (a bar per client and label would take matplotlib minutes at 10,000 clients). The
    legend sits right of the axes, never over a bar."""
    num_clients = histogram.shape[0]
    fig, ax = plt.subplots(figsize=(max(6, min(0.35 * num_clients, 24)) + 1.5, 4))
    clients = np.arange(num_clients)
    colours = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    palette = [colours(k % 20) for k in range(len(label_names))]
    if num_clients <= MAX_BARS:
        bottom = np.zeros(num_clients)
        for k, name in enumerate(label_names):
            ax.bar(clients, histogram[:, k], bottom=bottom, label=name, color=palette[k],
                   width=0.85)
            bottom += histogram[:, k]
    else:
        ax.stackplot(clients, histogram.T, labels=list(label_names), colors=palette,
                     step="mid")
        ax.set_xlim(-0.5, num_clients - 0.5)
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"label histogram per client ({num_clients} clients, "
                 f"{int(histogram.sum()):,} examples)")
    ax.legend(fontsize="small", title="label", loc="upper left", bbox_to_anchor=(1.01, 1),
              borderaxespad=0, ncol=1 if len(label_names) <= 12 else 2)
    fig.tight_layout()
    return fig


def plot_partitions(histogram: np.ndarray, label_names: tuple[str, ...] | list[str],
                    path: Path) -> None:
    """``partitions_figure`` as a PNG."""
    _save(partitions_figure(histogram, label_names), path)


def plot_sweep(table: list[dict], keys: list[str], x_key: str, series_key: str | None,
               metric: str, path: Path) -> None:
    """Mean ± std of ``metric`` against a grid key, one line per combination of the other
    keys (``series_key`` first in the label). Entries without an x value (reference runs)
    become horizontal lines; x = inf is drawn right of the largest finite x, marked ∞."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    other = [k for k in keys if k != x_key]
    if series_key in other:
        other.remove(series_key)
        other.insert(0, series_key)
    finite = [float(e[x_key]) for e in table
              if e.get(x_key) is not None and np.isfinite(float(e[x_key]))]
    top = max(finite) if finite else 1.0
    log_x = bool(finite) and min(finite) > 0 and top / min(finite) >= 10
    inf_at = top * 2 if log_x else top + 1

    def label(entry: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]}={entry[k]}" for k in other
                         if entry.get(k) is not None)

    lines: dict[str, list] = {}
    for entry in table:
        if entry["mean"] is None:
            continue
        if entry.get(x_key) is None:
            line = ax.axhline(entry["mean"], linestyle="--", color="grey", alpha=0.8)
            line.set_color(plt.get_cmap("tab10")(len(lines) % 10))
            ax.axhspan(entry["mean"] - entry["std"], entry["mean"] + entry["std"],
                       color=line.get_color(), alpha=0.08)
            line.set_label(f"reference: {label(entry)}")
            continue
        x = float(entry[x_key])
        lines.setdefault(label(entry), []).append(
            (inf_at if np.isinf(x) else x, entry["mean"], entry["std"]))
    for name, points in lines.items():
        xs, means, stds = (np.array(v, dtype=float) for v in zip(*sorted(points), strict=True))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name or metric)
    if log_x:
        ax.set_xscale("log")
    if any(e.get(x_key) is not None and np.isinf(float(e[x_key])) for e in table):
        ticks = sorted(set(finite)) + [inf_at]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["∞"])
        ax.minorticks_off()
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: list[tuple[str, list[dict[str, str]]]], path: Path) -> None:
    """Global test accuracy of several runs against the round and against the megabytes sent
    so far (up + down, log scale: transfer modes differ by orders of magnitude)."""
    fig, (round_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in curves:
        accuracy = _column(rows, "eval_accuracy")
        megabytes = np.cumsum(_column(rows, "bytes_up") + _column(rows, "bytes_down")) / 1e6
        round_ax.plot(_column(rows, "round"), accuracy, marker="o", label=label)
        bytes_ax.plot(megabytes, accuracy, marker="o", label=label)
    round_ax.set_xlabel("round")
    _whole_rounds(round_ax)
    round_ax.set_title("accuracy per round")
    bytes_ax.set_title("accuracy per megabyte sent")
    bytes_ax.set_xlabel("cumulative MB sent (up + down)")
    bytes_ax.set_xscale("log")
    for ax in (round_ax, bytes_ax):
        ax.set_ylabel("global test accuracy")
        ax.grid(alpha=0.3)
    round_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_round_curves(curves: list[dict], line_key: str, metric: str, path: Path) -> None:
    """``metric`` against the round, mean ± std band over seeds: one line per value of
    ``line_key``, one panel per combination of the other keys of the curves. Centralized
    references are black: dashed along the rounds (same examples), dotted and flat where the
    curve is ``flat`` (trained to convergence: the final value)."""
    panel_keys = [k for k in curves[0]
                  if k not in (line_key, "rounds", "mean", "std", "n", "flat")]

    def panel_of(curve: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]}={curve[k]}" for k in panel_keys) or metric

    panels = list(dict.fromkeys(panel_of(c) for c in curves))
    lines = list(dict.fromkeys(str(c[line_key]) for c in curves))
    federated = [name for name in lines if not name.startswith("centralized")]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False,
                             sharex=True)
    colours = plt.get_cmap("tab10")
    for ax, panel in zip(axes.flat, panels):
        for curve in (c for c in curves if panel_of(c) == panel):
            name = str(curve[line_key])
            central = name not in federated
            colour = "black" if central else colours(federated.index(name) % 10)
            mean, std = (np.array(curve[k], dtype=float) for k in ("mean", "std"))
            if curve.get("flat"):
                ax.axhline(mean[0], color=colour, linestyle=":", label=name)
                ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=colour, alpha=0.08)
                continue
            rounds = np.array(curve["rounds"], dtype=float)
            ax.plot(rounds, mean, color=colour, linestyle="--" if central else "-", label=name)
            ax.fill_between(rounds, mean - std, mean + std, color=colour,
                            alpha=0.1 if central else 0.2)
        ax.set_title(panel, fontsize="medium")
        _whole_rounds(ax)
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes.flat:  # every line once, whichever panel it first appears in
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 5), title=line_key, frameon=False)
    legend_rows = -(-len(handles) // 5)
    fig.tight_layout(rect=(0, min(0.4, (0.05 + 0.04 * legend_rows) * (2 if rows == 1 else 1)),
                           1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


PERSONAL_STYLES = {"global": ("global model", "tab:blue"),
                   "personalised": ("personalised", "tab:orange"),
                   "local_only": ("local only", "tab:green")}


def last_personal_round(rows: list[dict[str, str]]) -> dict[str, dict[int, float]]:
    """personal.csv's last evaluated round: model -> client id -> accuracy."""
    if not rows:
        return {}
    last = max(int(r["round"]) for r in rows)
    by_model: dict[str, dict[int, float]] = {}
    for row in rows:
        if int(row["round"]) == last and row["accuracy"] not in ("", None):
            by_model.setdefault(row["model"], {})[int(row["client_id"])] = float(row["accuracy"])
    return by_model


def personal_figure(rows: list[dict[str, str]], title: str = "") -> Figure:
    """The per-client accuracy distribution of the last personal evaluation: left, each
    model's clients sorted from worst to best (the share of clients at or below an accuracy,
    with the mean and the 10th percentile marked); right, each client's accuracy under each
    model, joined, worst global accuracy first."""
    by_model = last_personal_round(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, values in by_model.items():
        label, colour = PERSONAL_STYLES.get(name, (name, None))
        accuracies = np.sort(np.array(list(values.values())))
        share = np.arange(1, len(accuracies) + 1) / len(accuracies)
        mean, p10 = accuracies.mean(), np.percentile(accuracies, 10)
        left.step(accuracies, share, where="post", color=colour,
                  label=f"{label}: mean {mean:.3f}, p10 {p10:.3f}")
        left.axvline(p10, color=colour, linestyle=":", linewidth=1)
    left.set(xlabel="client accuracy on its local test split", ylabel="share of clients",
             ylim=(0, 1.02), title="per-client accuracy (dotted: 10th percentile)")
    left.legend(loc="best", fontsize=8)
    clients = sorted(by_model.get("global", {}),
                     key=lambda c: by_model["global"][c]) or sorted(
        {c for values in by_model.values() for c in values})
    position = {client: i for i, client in enumerate(clients)}
    for name, values in by_model.items():
        label, colour = PERSONAL_STYLES.get(name, (name, None))
        xs = [position[c] for c in clients if c in values]
        right.plot(xs, [values[c] for c in clients if c in values], "o", markersize=3,
                   color=colour, label=label, alpha=0.8)
    right.set(xlabel="clients, by their global model's accuracy", ylabel="accuracy",
              title="each client under each model")
    right.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_personal(rows: list[dict[str, str]], path: Path, title: str = "") -> None:
    """``personal_figure`` as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(personal_figure(rows, title), path)
