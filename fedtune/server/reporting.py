"""Progress of a run for whoever watches it: the CLI draws it, ``LogReporter`` logs it."""

from __future__ import annotations

import math
from logging import INFO
from typing import Any, Protocol

from flwr.common import log

from fedtune.config import Config
from fedtune.results.run_dir import RoundRow, RunDirectory
from fedtune.results.run_log import single_flower_lines


class Reporter(Protocol):
    """Receives progress (``fedtune.terminal.RichReporter`` draws it in a terminal). A
    reporter may also carry ``callbacks``, a caller's ``fedtune.server.callbacks.Callback``
    objects, which the server adds to the run's listeners (``fedtune.run(callbacks=...)``)."""

    def stage(self, text: str) -> None:
        """What the run is doing before its rounds ("loading data and model", ...)."""

    def start(self, config: Config, run_dir: RunDirectory) -> None: ...

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        """``phase`` (train, aggregate, evaluate, test) of ``server_round`` runs: ``done`` of
        ``total`` clients have answered (called with 0 as it starts; total 0: no clients)."""

    def round_end(self, row: RoundRow) -> None: ...

    def finish(self, summary: dict[str, Any], run_dir: RunDirectory) -> None: ...


class LogReporter:
    """Progress as log lines (for ``flwr run``, where fedtune owns no terminal)."""

    def __init__(self) -> None:
        single_flower_lines()

    def stage(self, text: str) -> None:
        log(INFO, "fedtune: %s", text)

    def start(self, config: Config, run_dir: RunDirectory) -> None:
        log(INFO, "fedtune: %d rounds, %d clients, run directory %s", config.run.rounds,
            config.data.num_clients, run_dir.path)

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        if total and done == total:  # a phase of clients ended (not one that starts)
            log(INFO, "round %d: %s replies %d/%d", server_round, phase, done, total)

    def round_end(self, row: RoundRow) -> None:
        log(INFO, "round %d: train_loss %.4f  test_acc %.4f  test_f1 %.4f  %.1fs",
            row.round, _nan(row.train_loss), _nan(row.eval_accuracy),
            _nan(row.eval_macro_f1), row.wall_s)

    def finish(self, summary: dict[str, Any], run_dir: RunDirectory) -> None:
        log(INFO, "fedtune: finished, results in %s", run_dir.path)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
