"""Callbacks: a user's hooks into the round loop, passed as ``fedtune.run(..., callbacks=[...])``.

What Hugging Face's ``TrainerCallback`` and pfl-research's ``TrainingProcessCallback`` give:
code of one's own that sees every round as it ends and may stop the run. A ``Callback``
subclass overrides the hooks it needs:

- ``on_run_start(config, run_dir)``: the run directory exists, before round 1 (or the first
  round after a resume).
- ``on_evaluate(round, metrics)``: the round's evaluation - the new global model on the
  held-out global test set (``eval_loss``, ``eval_accuracy``, ``eval_macro_f1``) and on the
  clients' local test splits (``federated_eval_loss``, ``federated_eval_accuracy``).
- ``on_round_end(info)``: the round's metrics.csv row and clients.csv rows, written to disk.
- ``on_save(what, path)``: a model or checkpoint was written (``"best_model"``,
  ``"checkpoint"``, ``"model"``: the final global model), as it is written: a round's best
  model before that round's ``on_evaluate``, its checkpoint after its ``on_round_end``.
- ``on_run_end(summary)``: summary.json, written.

``on_evaluate`` and ``on_round_end`` may return a text: the reason to stop. The run then ends
after that round as any finished run does (final model, plots, summary.json, whose
``stop_reason`` holds the text), as the privacy budget ends a run. ``EarlyStopping`` is such a
callback. Callbacks run in the process that runs the server (the driver), so they may keep
state, print or log; an exception in one fails the run, like any listener's.

This module imports nothing heavy (``import fedtune`` stays free of torch and Flower); the
listener that calls the callbacks is ``fedtune.server.listeners.UserCallbacks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVALUATION_KEYS = ("eval_loss", "eval_accuracy", "eval_macro_f1", "federated_eval_loss",
                   "federated_eval_accuracy")


@dataclass(frozen=True)
class RoundEnd:
    """What ``on_round_end`` gets: one finished round."""

    round: int  # the round that ended (1-based)
    rounds: int  # run.rounds, the last round the run would play
    metrics: dict[str, Any]  # its metrics.csv row (metric name -> value; None when empty)
    clients: list[dict[str, Any]]  # its clients.csv rows, one per sampled client
    run_dir: Path


class Callback:
    """Hooks into a run's round loop; every hook does nothing unless overridden."""

    def on_run_start(self, config: Any, run_dir: Path) -> None:
        """The run directory exists; ``config`` is the run's ``fedtune.config.Config``."""

    def on_evaluate(self, server_round: int, metrics: dict[str, float | None]) -> str | None:
        """The round's evaluation; return a reason to stop the run after this round."""
        return None

    def on_round_end(self, info: RoundEnd) -> str | None:
        """The round's rows are written; return a reason to stop the run after this round."""
        return None

    def on_save(self, what: str, path: Path) -> None:
        """``what`` ("best_model", "checkpoint", "model") was written to ``path``."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run finished (its last round, or stopped early); summary.json is written."""


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience``
    evaluations in a row (Prechelt 1998, "Early Stopping - But When?"; the rule of Keras'
    and Hugging Face's EarlyStoppingCallback). ``mode``: "max" for accuracies, "min" for
    losses. The best round is kept in ``best`` and ``best_round``; with ``run.save_best =
    true`` its model is in model_best/."""

    def __init__(self, metric: str = "eval_accuracy", patience: int = 3,
                 min_delta: float = 0.0, mode: str = "max") -> None:
        if metric not in EVALUATION_KEYS:
            raise ValueError(f"metric = {metric!r} is not allowed: must be one of "
                             + ", ".join(repr(k) for k in EVALUATION_KEYS))
        if mode not in ("max", "min") or patience < 1 or min_delta < 0:
            raise ValueError(f"mode = {mode!r}, patience = {patience}, min_delta = "
                             f"{min_delta} are not allowed: mode must be 'max' or 'min', "
                             "patience >= 1, min_delta >= 0")
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_round = 0
        self.waited = 0

    def on_evaluate(self, server_round: int, metrics: dict[str, float | None]) -> str | None:
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            return None
        gain = value - self.best if self.mode == "max" else self.best - value
        if gain > self.min_delta:
            self.best, self.best_round, self.waited = value, server_round, 0
            return None
        self.waited += 1
        if self.waited < self.patience:
            return None
        return (f"early stopping: {self.metric} has not improved by more than "
                f"{self.min_delta:g} for {self.patience} rounds (best {self.best:.4f} at round "
                f"{self.best_round})")
