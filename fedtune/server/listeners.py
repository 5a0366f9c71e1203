"""The listeners every run has (``fedtune.server.loop``), in the order the loop calls them.

1. ``NoUpdateStop``: fails the run after ``run.max_rounds_without_update`` rounds in a row
   without an update of the global model (too few sound updates, or an aggregate the guard
   refused), before that round is recorded.
2. ``PrivacyStop``: the privacy mode's budget - a round that would pass the target ε does not
   run; a round in which every sampled client had spent its budget is the last.
3. ``RoundWriter``: one metrics.csv row and the clients.csv rows of each round (its training
   clients, then its evaluations that did not count), and what the strategy aggregated from
   the train replies (strategy_metrics.jsonl).
4. ``BestModel`` (``run.save_best``): the model of the best round so far, in model_best/.
5. ``CentralizedReference`` (with ``run.reference = true``): trains (or reuses) the run's
   centralized reference and hands ``centralized_accuracy`` to summary.json.
6. ``FinalArtifacts``: the final model, plots and summary.json.
7. ``AuditWriter``: with ``privacy.audit``, the empirical privacy audit of the final model
   (``fedtune.audit``: audit.json, plots/audit.png).
8. ``Tracking`` (``[tracking]``): TensorBoard and MLflow (``fedtune.results.tracking``).
9. ``ProgressListener``: the live reporter (a terminal, or log lines).
10. ``fedtune.server.resume.Checkpointer``: the checkpoint after each round (and on abort).

A user's callbacks (``fedtune.run(..., callbacks=[...])``, ``fedtune.server.callbacks``) run
through ``UserCallbacks``, after ``Tracking``: they see each round once its rows (and a best
model) are on disk, may stop the run after it (before its checkpoint, which records why), hear
of every model and checkpoint saved, and get summary.json (and audit.json) at the end.
"""

from __future__ import annotations

import time
import warnings
from logging import INFO
from typing import Any

from flwr.common import log

from fedtune import protocol
from fedtune.audit.report import run_audit, save_canary_release, write_audit
from fedtune.centralized import ensure_reference, reference_path, reference_section
from fedtune.errors import one_line
from fedtune.models.build import build_model, save_model
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.privacy.mode import PrivacyPlan
from fedtune.results.plots import plot_accuracy_loss, plot_epsilon
from fedtune.results.run_dir import RunDirectory
from fedtune.results.summary import (
    build_summary,
    majority_class_accuracy,
    privacy_setting,
    run_title,
)
from fedtune.results.tracking import Tracker
from fedtune.server.callbacks import EVALUATION_KEYS, Callback, RoundEnd
from fedtune.server.loop import RunFailed, RunListener
from fedtune.server.reporting import Reporter
from fedtune.server.round import FederatedRun, RoundOutcome
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import strategy_arguments
from fedtune.train import EvalResult


class NoUpdateStop(RunListener):
    """A run whose clients keep failing is stopped rather than left to spin."""

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        state = run.state
        if state.rounds_without_update >= run.config.run.max_rounds_without_update:
            reasons = one_line("; ".join([outcome.row.model_update, *sorted(
                {r.reason for r in outcome.clients if r.reason})]), 1000)
            raise RunFailed(
                f"round {state.server_round}: {state.rounds_without_update} rounds in a row "
                f"without an update of the global model (run.max_rounds_without_update); last "
                f"reasons: {reasons}")


class PrivacyStop(RunListener):
    """The privacy budget ends the run early."""

    def stop_before(self, run: FederatedRun, server_round: int) -> str:
        return run.privacy.stop_before(server_round)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        if outcome.sampled and outcome.declined == outcome.sampled:
            run.state.stop_reason = (f"privacy budget: every client sampled in round "
                                     f"{run.state.server_round} has spent its budget")


class RoundWriter(RunListener):
    """Appends each round's rows to the run directory (flushed, so a crash loses nothing)."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        metrics = dict(outcome.train_metrics) if outcome.train_metrics else None
        self.run_dir.append_round(outcome.row, outcome.clients + outcome.evaluations, metrics)


class UserCallbacks(RunListener):
    """Calls a user's ``Callback`` objects (``fedtune.server.callbacks``) as the run goes; a
    reason to stop that one returns ends the run after the round, as ``PrivacyStop`` does."""

    def __init__(self, callbacks: list[Callback], run_dir: RunDirectory,
                 artifacts: FinalArtifacts) -> None:
        self.callbacks = list(callbacks)
        self.run_dir = run_dir
        self.artifacts = artifacts

    def run_started(self, run: FederatedRun) -> None:
        run.save_hooks.append(self._saved)
        for callback in self.callbacks:
            callback.on_run_start(run.config, self.run_dir.path)

    def _saved(self, what: str, path: Any) -> None:
        for callback in self.callbacks:
            callback.on_save(what, path)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        row = outcome.row.__dict__
        evaluation = {key: row[key] for key in EVALUATION_KEYS}
        info = RoundEnd(outcome.row.round, run.config.run.rounds, dict(row),
                        [dict(client.__dict__) for client in outcome.clients],
                        self.run_dir.path)
        for callback in self.callbacks:
            reasons = [callback.on_evaluate(outcome.row.round, dict(evaluation)),
                       callback.on_round_end(info)]
            reason = next((r for r in reasons if r), "")
            if reason and not run.state.stop_reason:
                run.state.stop_reason = reason

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        for callback in self.callbacks:
            callback.on_run_end(self.artifacts.summary)


class BestModel(RunListener):
    """``run.save_best``: after a round whose global test accuracy beats every earlier round's,
    its model goes to <run dir>/model_best/ (a resumed run remembers the best so far)."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self.best = -1.0

    def run_started(self, run: FederatedRun) -> None:
        earlier = [float(r["eval_accuracy"]) for r in self.run_dir.metrics()
                   if r.get("eval_accuracy") not in (None, "")]
        self.best = max(earlier, default=-1.0)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        accuracy = outcome.row.eval_accuracy
        if accuracy is None or accuracy <= self.best:
            return
        self.best = accuracy
        load_shared_state(run.resources.model, protocol.to_numpy(run.state.arrays))
        save_model(run.resources.model, run.resources.spec, self.run_dir.best_model_dir)
        run.announce_saved("best_model", self.run_dir.best_model_dir)


class FinalArtifacts(RunListener):
    """The final model, the plots and summary.json, when every round is done; ``extra`` holds
    what listeners before it add to summary.json."""

    def __init__(self, run_dir: RunDirectory, plan: PrivacyPlan,
                 runtime: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.plan = plan
        self.runtime = runtime  # None: engine.backend's, as the runtime table describes it
        self.summary: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        config, resources = run.config, run.resources
        if run.state.stop_reason:
            log(INFO, "fedtune: %s", run.state.stop_reason)
        load_shared_state(resources.model, protocol.to_numpy(run.state.arrays))
        save_model(resources.model, resources.spec, self.run_dir.model_dir)
        run.announce_saved("model", self.run_dir.model_dir)
        rows = self.run_dir.metrics()
        plot_accuracy_loss(rows, self.run_dir.plots_dir / "accuracy_loss.png",
                           majority_class_accuracy(resources), run_title(config))
        if PRIVACY_MODES[config.privacy.mode].spends_budget:
            plot_epsilon(rows, config.privacy.target_epsilon,
                         self.run_dir.plots_dir / "epsilon.png", privacy_setting(config))
        total_s = run.state.elapsed_s + time.perf_counter() - run.started
        self.summary = build_summary(
            config, resources, self.run_dir, final, total_s, run.state.stop_reason,
            strategy={"name": config.strategy.name, **strategy_arguments(config)},
            privacy=run.privacy.summary(config, self.plan),
            runtime=self.runtime or {
                "backend": config.engine.backend,
                "reproducible": RUNTIMES[config.engine.backend].reproducible},
            **self.extra)
        if config.run.save_best and self.run_dir.best_model_dir.is_dir():
            self.summary["best"]["model"] = self.run_dir.best_model_dir.name
        self.run_dir.write_json("summary.json", self.summary)


class CentralizedReference(RunListener):
    """``run.reference = true``: when the rounds are done, the centralized reference
    (``fedtune.centralized``) is trained - or a finished one in ``run.reference_dir`` reused -
    before summary.json is written, so a finished run always has ``centralized_accuracy``."""

    def __init__(self, artifacts: FinalArtifacts) -> None:
        self.artifacts = artifacts

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        log(INFO, "fedtune: centralized reference in %s", reference_path(run.config))
        run.progress(run.state.server_round, "central", 0, 0)
        reference = ensure_reference(run.config)
        self.artifacts.extra.update(reference_section(reference, final.accuracy))


class AuditWriter(RunListener):
    """``privacy.audit``: the empirical privacy audit after the last round, beside the
    accountant's ε (inf where nothing is accounted)."""

    def __init__(self, run_dir: RunDirectory, plan: PrivacyPlan) -> None:
        self.run_dir = run_dir
        self.plan = plan

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        config = run.config
        if not config.privacy.audit:
            return
        initial = shared_state(build_model(run.resources.spec, config.run.seed))
        spent = run.privacy.summary(config, self.plan).get("epsilon")
        # canary clients: the shadow release the strategy kept; canary examples: the model
        release = getattr(run.strategy, "canary_release", None)
        if release is not None:
            final = release()
            save_canary_release(self.run_dir, final)
        else:
            final = protocol.to_numpy(run.state.arrays)
        audit = run_audit(config, run.resources, initial, final,
                          float("inf") if spent is None else float(spent))
        write_audit(self.run_dir, audit)


class Tracking(RunListener):
    """Sends each round to the trackers ``[tracking]`` asks for (TensorBoard, MLflow). A tracker
    that fails after the run started is dropped with a warning: the run and its directory go on."""

    def __init__(self, trackers: list[Tracker], run_dir: RunDirectory) -> None:
        self.trackers = trackers
        self.run_dir = run_dir

    def run_started(self, run: FederatedRun) -> None:
        for tracker in self.trackers:
            tracker.start(run.config, self.run_dir, run.state.server_round + 1)

    def _each(self, hook: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, hook)(*args)
            except Exception as error:  # noqa: BLE001 - tracking must not end a run
                self.trackers.remove(tracker)
                warnings.warn(f"{type(tracker).__name__} stopped logging this run: {error}",
                              RuntimeWarning, stacklevel=2)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        self._each("round", outcome.row, outcome.clients)

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        self._each("finish", self.run_dir)

    def run_aborted(self, run: FederatedRun, error: BaseException) -> None:
        stopped = type(error).__name__ in ("RunStopped", "KeyboardInterrupt")
        self._each("close", not stopped)


class ProgressListener(RunListener):
    """Tells a ``Reporter`` how the run goes."""

    def __init__(self, reporter: Reporter, run_dir: RunDirectory,
                 artifacts: FinalArtifacts) -> None:
        self.reporter = reporter
        self.run_dir = run_dir
        self.artifacts = artifacts

    def run_started(self, run: FederatedRun) -> None:
        self.reporter.start(run.config, self.run_dir)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        self.reporter.round_end(outcome.row)

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        self.reporter.finish(self.artifacts.summary, self.run_dir)
