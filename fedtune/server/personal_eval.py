"""``PersonalEvaluation``: every client's models on its own local test split, in the rounds
``run.personal_eval_every`` names and at the end (``fedtune.personal.evaluation``).

It writes personal.csv (one row per client and model: global, personalised, local-only), fills
the round's metrics.csv columns ``personal_*`` (the distribution of each client's own model:
its personalised one, or the global one where the strategy makes none) and hands summary.json
its ``personal`` section and plots/personal_accuracy.png. It runs before ``RoundWriter``.
Where the runtime keeps every client's state in its ``ClientStateStore`` the rows are computed
here; where the clients keep their own (Flower's simulation, a deployment) each client computes
its rows and replies metrics only (``fedtune.server.personal_messages``).
"""

from __future__ import annotations

from dataclasses import asdict

from fedtune import protocol
from fedtune.personal.base import personalisation_of
from fedtune.personal.evaluation import evaluate_clients, local_only_rows
from fedtune.personal.stats import LOCAL_ONLY, summarise
from fedtune.results.plots import last_personal_round, plot_personal
from fedtune.results.run_dir import RunDirectory
from fedtune.results.summary import run_title
from fedtune.server.listeners import FinalArtifacts
from fedtune.server.loop import RunListener
from fedtune.server.personal_messages import personal_rows_by_messages
from fedtune.server.round import FederatedRun, RoundOutcome
from fedtune.state.store import ClientStateStore
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES
from fedtune.train import EvalResult

OUTSIDE_DP = ("each client's personal part (its personalised model, head or mixing weight) "
              "never leaves it and is not covered by the DP guarantee, which bounds only what "
              "the server releases: the global model")


class PersonalEvaluation(RunListener):
    """Evaluates every registered client, sampled or not, with the state its runtime keeps."""

    def __init__(self, run_dir: RunDirectory, artifacts: FinalArtifacts,
                 store: ClientStateStore | None) -> None:
        self.run_dir = run_dir
        self.artifacts = artifacts
        self.store = store
        self.evaluated = 0  # the last round evaluated

    def run_started(self, run: FederatedRun) -> None:
        self.algorithm = personalisation_of(run.config)
        self.evaluated = max((int(r["round"]) for r in self.run_dir.personal()), default=0)

    def _due(self, run: FederatedRun, server_round: int) -> bool:
        every = run.config.run.personal_eval_every
        return server_round == run.config.run.rounds or bool(every and server_round % every == 0)

    def _evaluate(self, run: FederatedRun, server_round: int) -> dict:
        config, resources = run.config, run.resources
        clients = resources.federation.num_clients
        run.progress(server_round, "personal", 0, clients)
        local_only = bool(config.run.local_reference and server_round == run.state.server_round
                          and (server_round == config.run.rounds or run.state.stop_reason))
        if self.store is None:  # the clients keep their states: they evaluate themselves
            personalised = bool(STRATEGIES[config.strategy.name].personal)
            rows = personal_rows_by_messages(run, server_round, personalised, local_only)
        else:  # the runtime's store holds every state: the same rows, computed here
            rows = evaluate_clients(resources, self.algorithm,
                                    protocol.to_numpy(run.state.arrays), self.store.get,
                                    server_round)
            if local_only:
                run.progress(server_round, "alone", 0, clients)
                rows += local_only_rows(resources, server_round)
        self.run_dir.append_personal([asdict(row) for row in rows])
        self.evaluated = server_round
        return summarise(last_personal_round(self.run_dir.personal()))

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        server_round = run.state.server_round
        if not self._due(run, server_round):
            return
        summary = self._evaluate(run, server_round)
        own = summary["models"][summary["own_model"]]
        row = outcome.row
        row.personal_mean, row.personal_median = own["mean"], own["median"]
        row.personal_p10, row.personal_worst, row.personal_std = (own["p10"], own["worst"],
                                                                   own["std"])
        row.personal_worse_than_global = summary["worse_than_global"]
        row.personal_worse_than_local = summary["worse_than_local_only"]

    def run_ended(self, run: FederatedRun, final: EvalResult) -> None:
        if self.evaluated < run.state.server_round:  # stopped early, or resumed after it
            self._evaluate(run, run.state.server_round)
        rows = self.run_dir.personal()
        by_model = last_personal_round(rows)
        if not by_model:
            return
        section = {"round": max(int(r["round"]) for r in rows), **summarise(by_model),
                   "local_only": LOCAL_ONLY in by_model}
        config = run.config
        if STRATEGIES[config.strategy.name].personal and PRIVACY_MODES[
                config.privacy.mode].spends_budget:  # a DP guarantee, and a personal part
            section["privacy"] = OUTSIDE_DP
        self.artifacts.extra["personal"] = section
        plot_personal(rows, self.run_dir.plots_dir / "personal_accuracy.png",
                      run_title(config))
