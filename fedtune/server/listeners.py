"""The listeners every run has (``fedtune.server.loop``), in the order the loop calls them.

1. ``NoUpdateStop``: fails the run after ``run.max_rounds_without_update`` rounds in a row
   without enough sound updates (before that round is recorded).
2. ``PrivacyStop``: the privacy mode's budget - a round that would pass the target ε does not
   run; a round in which every sampled client had spent its budget is the last.
3. ``RoundWriter``: one metrics.csv row and the clients.csv rows of each round, and what the
   strategy aggregated from the train replies (strategy_metrics.jsonl).
4. ``CentralizedReference`` (with ``run.reference = true``): trains (or reuses) the run's
   centralized reference and hands ``centralized_accuracy`` to summary.json.
5. ``FinalArtifacts``: the final model, plots and summary.json.
6. ``AuditWriter``: with ``privacy.audit``, the empirical privacy audit of the final model
   (``fedtune.audit``: audit.json, plots/audit.png).
7. ``ProgressListener``: the live reporter (a terminal, or log lines).
8. ``fedtune.server.resume.Checkpointer``: the checkpoint after each round (and on abort).
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

from flwr.common import log

from fedtune import protocol
from fedtune.audit.report import run_audit, save_canary_release, write_audit
from fedtune.centralized import ensure_reference, reference_path, reference_section
from fedtune.models.build import build_model, save_model
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.privacy.mode import PrivacyPlan
from fedtune.results.plots import plot_accuracy_loss, plot_epsilon
from fedtune.results.run_dir import RunDirectory
from fedtune.results.summary import build_summary
from fedtune.server.loop import RunListener
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
            reasons = "; ".join(sorted({r.reason for r in outcome.clients if r.reason}))[:1000]
            raise RuntimeError(
                f"round {state.server_round}: {state.rounds_without_update} rounds in a row "
                f"without enough sound client updates (run.max_rounds_without_update); last "
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
        self.run_dir.append_round(outcome.row, outcome.clients, metrics)


class FinalArtifacts(RunListener):
    """The final model, the plots and summary.json, when every round is done; ``extra`` holds
    what listeners before it add to summary.json."""

    def __init__(self, run_dir: RunDirectory, plan: PrivacyPlan) -> None:
        self.run_dir = run_dir
        self.plan = plan
        self.summary: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        config, resources = run.config, run.resources
        if run.state.stop_reason:
            log(INFO, "fedtune: %s", run.state.stop_reason)
        load_shared_state(resources.model, protocol.to_numpy(run.state.arrays))
        save_model(resources.model, resources.spec, self.run_dir.model_dir)
        rows = self.run_dir.metrics()
        plot_accuracy_loss(rows, self.run_dir.plots_dir / "accuracy_loss.png")
        if PRIVACY_MODES[config.privacy.mode].spends_budget:
            plot_epsilon(rows, config.privacy.target_epsilon,
                         self.run_dir.plots_dir / "epsilon.png")
        total_s = run.state.elapsed_s + time.perf_counter() - run.started
        self.summary = build_summary(
            config, resources, self.run_dir, final, total_s, run.state.stop_reason,
            strategy={"name": config.strategy.name, **strategy_arguments(config)},
            privacy=run.privacy.summary(config, self.plan),
            runtime={"backend": config.engine.backend,
                     "reproducible": RUNTIMES[config.engine.backend].reproducible},
            **self.extra)
        self.run_dir.write_json("summary.json", self.summary)


class CentralizedReference(RunListener):
    """``run.reference = true``: when the rounds are done, the centralized reference
    (``fedtune.centralized``) is trained - or a finished one in ``run.reference_dir`` reused -
    before summary.json is written, so a finished run always has ``centralized_accuracy``."""

    def __init__(self, artifacts: FinalArtifacts) -> None:
        self.artifacts = artifacts

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        log(INFO, "fedtune: centralized reference in %s", reference_path(run.config))
        run.progress(run.state.server_round, "central", 0, 1)
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
