"""The round loop and its listeners.

``run_rounds`` plays one round after another (``fedtune.server.round.play_round``) and hands
each outcome to its listeners, in order. Everything beside training - writing metrics.csv and
clients.csv, checkpoints, the live reporter, the rules that stop a run early, the final model,
plots and summary - is a listener (pfl-research's ``TrainingProcessCallback``), so the loop
itself never branches on what is configured. A listener raising stops the run; the loop then
tells every listener (``run_aborted``: the checkpointer writes the last finished round) and
re-raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fedtune.server.round import FederatedRun, RoundOutcome, evaluate_global, play_round
from fedtune.train import EvalResult


class RunFailed(RuntimeError):
    """A listener ended the run because it cannot usefully go on (its message says why); the
    finished rounds and the checkpoint of the last one stay on disk."""


class RunListener:
    """A side concern of a run; every hook does nothing unless overridden."""

    def run_started(self, run: FederatedRun) -> None:
        """The run directory exists and the model is initialised (or restored)."""

    def stop_before(self, run: FederatedRun, server_round: int) -> str:
        """Why ``server_round`` must not run ("" = it may); the run then ends normally."""
        return ""

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        """``outcome`` is ``run.state.server_round``'s; set ``run.state.stop_reason`` to end
        the run after it, raise to abort it."""

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        """Every round is done; ``final`` evaluates the final global model."""

    def run_aborted(self, run: FederatedRun, error: BaseException) -> None:
        """The run stopped with ``error`` (Ctrl-C, a failure) and is about to re-raise it."""


Play = Callable[[FederatedRun, int], RoundOutcome]


def run_rounds(run: FederatedRun, listeners: Sequence[RunListener],
               play: Play = play_round) -> EvalResult:
    """Play the rounds after ``run.state.server_round`` up to ``run.rounds``, or until a
    listener stops the run; returns the final global model's evaluation (the last round's, or
    the checkpoint's when a resumed run had no round left). A final model whose loss on the
    global test set is not finite fails the run (``RunFailed``): no run ends "finished" with
    it. ``play``: one round (an asynchronous run's: one server update,
    ``fedtune.server.async_loop``)."""
    final: EvalResult | None = None
    try:
        for server_round in range(run.state.server_round + 1, run.config.run.rounds + 1):
            if not run.state.stop_reason:
                run.state.stop_reason = next(
                    (reason for listener in listeners
                     if (reason := listener.stop_before(run, server_round))), "")
            if run.state.stop_reason:
                break
            outcome = play(run, server_round)
            run.state.server_round = server_round
            for listener in listeners:
                listener.round_ended(run, outcome)
            final = outcome.evaluation
        if final is None:
            final = evaluate_global(run.resources, run.state.arrays)
        if not math.isfinite(final.loss):
            raise RunFailed(f"the final global model's loss on the global test set is "
                            f"{final.loss}: not a model to keep")
    except BaseException as error:
        if run.stop is not None:  # heeded: who set it (Ctrl-C) lets the listeners finish
            run.stop.clear()
        for listener in listeners:
            listener.run_aborted(run, error)
        raise
    return final
