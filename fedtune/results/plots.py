"""Figures of a run, drawn from its CSV files (so ``fedtune report`` can redraw them)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])


def plot_accuracy_loss(rows: list[dict[str, str]], path: Path) -> None:
    """Global test accuracy / macro-F1 and train / test loss against the round."""
    rounds = _column(rows, "round")
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(rounds, _column(rows, "eval_accuracy"), marker="o", label="global test accuracy")
    acc_ax.plot(rounds, _column(rows, "eval_macro_f1"), marker="s", label="global test macro-F1")
    federated = _column(rows, "federated_eval_accuracy")
    if np.isfinite(federated).any():
        acc_ax.plot(rounds, federated, marker="^", linestyle="--",
                    label="clients' local test accuracy")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("score")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend()
    loss_ax.plot(rounds, _column(rows, "train_loss"), marker="o", label="train loss (clients)")
    loss_ax.plot(rounds, _column(rows, "eval_loss"), marker="s", label="global test loss")
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MAX_BARS = 100  # clients drawn as bars; more are drawn as stacked areas (one shape per label)


def plot_partitions(histogram: np.ndarray, label_names: tuple[str, ...] | list[str],
                    path: Path) -> None:
    """Examples of each label held by each client: stacked bars, or stacked areas for many
    clients (a bar per client and label would take matplotlib minutes at 10,000 clients)."""
    num_clients = histogram.shape[0]
    fig, ax = plt.subplots(figsize=(max(6, min(0.35 * num_clients, 24)), 4))
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
    ax.set_title("label histogram per client")
    ax.legend(fontsize="small", ncol=min(len(label_names), 5), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(table: list[dict], x_key: str, series_key: str | None, metric: str,
               path: Path) -> None:
    """Mean ± std of ``metric`` against a grid key, one line per value of ``series_key``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series = sorted({str(e.get(series_key)) for e in table}) if series_key else [None]
    for name in series:
        points = [e for e in table if series_key is None or str(e.get(series_key)) == name]
        points = sorted((float(e[x_key]), e["mean"], e["std"]) for e in points
                        if e["mean"] is not None)
        if not points:
            continue
        xs, means, stds = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        label = f"{series_key.split('.')[-1]}={name}" if series_key else metric
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
