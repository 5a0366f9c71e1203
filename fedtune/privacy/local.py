"""``privacy.mode = "local"``: sample-level DP on every client, DP-SGD (Abadi et al. 2016).

A client trains with Opacus (``fedtune.privacy.dp_sgd``); its accountant history lives in its
``Context.state``, so its ε accumulates over every round it trains. A client whose budget allows
no further step sends no update and says why (a reply without arrays whose ``STATUS`` gives the
reason); the server records it as ``rejected`` with that reason and stops the run once every
sampled client has spent its budget. The server reports the largest client ε each round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from fedtune import protocol
from fedtune.errors import ConfigError
from fedtune.privacy.accounting import (
    ACCOUNTANT_LIBRARY,
    history_from_lists,
    history_to_lists,
)
from fedtune.privacy.dp_sgd import LocalDPSettings, poisson_loader, train_private
from fedtune.privacy.mode import LocalTraining, PrivacyMode, PrivacyPlan, PrivacyServer

if TYPE_CHECKING:
    from flwr.app import MetricRecord, RecordDict

    from fedtune.config import Config
    from fedtune.results.run_dir import ClientRow
    from fedtune.task import TaskResources
    from fedtune.train import GradientTerms


def local_dp_settings(config: Config) -> LocalDPSettings:
    p = config.privacy
    return LocalDPSettings(delta=p.delta, max_grad_norm=p.max_grad_norm, accountant=p.accountant,
                           grad_sample_mode=p.grad_sample_mode,
                           target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier,
                           planned_rounds=p.client_rounds or config.run.rounds)


class LocalServer(PrivacyServer):
    """What the server keeps of the clients' budgets: each client's latest ε (keyed by its id
    as text, so checkpoints can hold it) and the noise multipliers they reported."""

    accepts_declines = True

    def __init__(self) -> None:
        self.client_epsilons: dict[str, float] = {}
        self.noise_multipliers: list[float] = []  # smallest and largest reported so far

    def record_round(self, rows: Sequence[ClientRow], accepted: Sequence[Mapping[str, Any]],
                     aggregated: MetricRecord | None = None) -> None:
        for row in rows:
            if row.epsilon is not None and row.client_id is not None:
                self.client_epsilons[str(row.client_id)] = row.epsilon
        reported = [float(metrics[protocol.NOISE_MULTIPLIER]) for metrics in accepted
                    if protocol.NOISE_MULTIPLIER in metrics]
        if reported:
            every = self.noise_multipliers + reported
            self.noise_multipliers = [min(every), max(every)]

    def columns(self) -> dict[str, float | None]:
        largest = max(self.client_epsilons.values()) if self.client_epsilons else None
        return {**super().columns(), "max_client_epsilon": largest}

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        p = config.privacy
        no_noise = bool(self.noise_multipliers) and self.noise_multipliers[1] == 0
        spent = (math.inf if no_noise else
                 max(self.client_epsilons.values()) if self.client_epsilons else 0.0)
        return {"mode": "local", "epsilon": spent, "delta": p.delta,
                "accountant": p.accountant, "accountant_library": ACCOUNTANT_LIBRARY,
                "target_epsilon": p.target_epsilon or None,
                "noise_multiplier": p.noise_multiplier or None,
                "client_noise_multipliers": (dict(zip(("min", "max"), self.noise_multipliers))
                                             if self.noise_multipliers else None)}


class LocalDP(PrivacyMode):
    """DP-SGD on every client, its accountant in the client's Context.state."""

    def check_data(self, config: Config, client_sizes: Sequence[int]) -> None:
        """δ must be below 1/n for every client's n examples (else releasing one is allowed).
        No sizes (the server of a files dataset sees no client data): each party checks its
        own."""
        if not client_sizes:
            return
        smallest = min(client_sizes)
        if config.privacy.delta >= 1 / smallest:
            raise ConfigError(
                f"privacy.delta = {config.privacy.delta:g} is not allowed: must be < 1/n = "
                f"{1 / smallest:g} for the smallest client's n = {smallest} training examples"
            )

    def server(self, config: Config, plan: PrivacyPlan) -> LocalServer:
        return LocalServer()

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              objective: GradientTerms | None) -> LocalTraining:
        """DP-SGD whose accountant history lives in ``state`` across rounds (the config refuses
        strategies with a client-side objective, so ``objective`` is None)."""
        config = resources.config
        loader = poisson_loader(resources.encoded, resources.federation.data.labels,
                                resources.federation.client_train_rows[shard],
                                config.client.batch_size, seed, resources.model)
        history = (history_from_lists(state[protocol.ACCOUNTANT_STATE])
                   if protocol.ACCOUNTANT_STATE in state else [])
        private = train_private(resources.model, loader, resources.train_settings,
                                local_dp_settings(config), history, resources.device)
        state[protocol.ACCOUNTANT_STATE] = ConfigRecord(history_to_lists(private.history))
        metrics = {protocol.NOISE_MULTIPLIER: private.noise_multiplier,
                   protocol.SAMPLE_RATE: private.sample_rate}
        if math.isfinite(private.epsilon):  # replies carry finite numbers; no noise = no ε
            metrics[protocol.EPSILON] = private.epsilon
        return LocalTraining(private.train, metrics, status=private.stopped)
