"""``privacy.mode = "local"``: sample-level DP on every client, DP-SGD (Abadi et al. 2016).

A client trains with Opacus (``fedtune.privacy.dp_sgd``), or where clients train together
with the same numbers batched (``fedtune.client.private_chunks``, ``fedtune.privacy.
stacked_dp_sgd``); its accountant history lives in its ``Context.state``, so its ε accumulates
over every round it trains. A client whose budget allows no further step sends no update and
says why (a reply without arrays whose ``STATUS`` gives the reason); the server records it as
``rejected`` with that reason and stops the run once every sampled client has spent its
budget.

The server does not take a client's word for its ε (a client could report 0). It accounts
every client itself from what it asked for: the noise multiplier of the config (or the one a
client must derive from ``target_epsilon``, which the server derives the same way), the
client's Poisson rate (one over its batches per epoch, from its training-set size - known to
the server in a simulation, as the reply states it when parties hold their own files) and the
steps the client's budget allowed each round it sent an update (the client's own rule,
``plan_steps``, replayed on the server's copy of its history). summary.json and metrics.csv
report the largest of these; clients.csv keeps what each client reported, and summary.json
counts the clients whose report disagrees. What the server cannot check stays the client's
word: that it clipped and noised as asked (docs/privacy.md).
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
    epsilon,
    history_from_lists,
    history_to_lists,
)
from fedtune.privacy.dp_sgd import (
    LocalDPSettings,
    plan_steps,
    poisson_loader,
    poisson_steps,
    train_private,
)
from fedtune.privacy.mode import (
    LocalTraining,
    PrivacyMode,
    PrivacyPlan,
    PrivacyServer,
    noise_source,
)
from fedtune.tables.privacy_modes import check_prv_compositions
from fedtune.train import TrainSettings

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
                           planned_rounds=p.client_rounds or config.run.rounds,
                           secure=not p.insecure_reproducible_noise)


class LocalServer(PrivacyServer):
    """The server's own account of every client's budget (keyed by client id as text, so
    checkpoints can hold it; plain values only), what the clients reported beside it, and the
    noise multipliers they reported."""

    def __init__(self, config: Config, client_sizes: Sequence[int] = ()) -> None:
        p, c = config.privacy, config.client
        self.delta, self.accountant = p.delta, p.accountant
        self.target_epsilon, self.noise_multiplier = p.target_epsilon, p.noise_multiplier
        self.planned_rounds = p.client_rounds or config.run.rounds
        self.batch_size, self.local_steps, self.local_epochs = (
            c.batch_size, c.local_steps, c.local_epochs)
        self.client_sizes = {str(i): int(n) for i, n in enumerate(client_sizes)}
        self.histories: dict[str, dict[str, list]] = {}  # the server's accountant per client
        self.client_epsilons: dict[str, float] = {}  # ε the server computed
        self.reported_epsilons: dict[str, float] = {}  # ε the clients reported
        self.disagreements: dict[str, str] = {}  # client -> its first report the server doubts
        self.noise_multipliers: list[float] = []  # smallest and largest reported so far

    def _settings(self) -> LocalDPSettings:
        return LocalDPSettings(delta=self.delta, max_grad_norm=1.0, accountant=self.accountant,
                               target_epsilon=self.target_epsilon,
                               noise_multiplier=self.noise_multiplier,
                               planned_rounds=self.planned_rounds)

    def account(self, metrics: Mapping[str, Any]) -> None:
        """Compose one accepted update into its client's history, from what the server asked
        for; note where the client's report differs."""
        client = str(int(metrics[protocol.PARTITION_ID]))
        size = self.client_sizes.get(client) or int(metrics[protocol.NUM_EXAMPLES])
        history = history_from_lists(self.histories[client]) if client in self.histories else []
        local = TrainSettings(local_epochs=self.local_epochs, local_steps=self.local_steps)
        plan = plan_steps(size, poisson_steps(size, self.batch_size), local, self._settings(),
                          history)
        noise, rate, steps = plan.noise_multiplier, plan.sample_rate, plan.allowed
        history = plan.history_after(history)
        self.histories[client] = history_to_lists(history)
        spent = epsilon(history, self.delta, self.accountant)
        self.client_epsilons[client] = spent
        reported = metrics.get(protocol.EPSILON)
        if reported is not None:
            self.reported_epsilons[client] = float(reported)
        doubt = _disagreement(metrics, noise, rate, steps, spent)
        if doubt and client not in self.disagreements:
            self.disagreements[client] = doubt

    def record_round(self, rows: Sequence[ClientRow], accepted: Sequence[Mapping[str, Any]],
                     aggregated: MetricRecord | None = None) -> None:
        for metrics in accepted:
            if protocol.PARTITION_ID in metrics:
                self.account(metrics)
        reported = [float(metrics[protocol.NOISE_MULTIPLIER]) for metrics in accepted
                    if protocol.NOISE_MULTIPLIER in metrics]
        if reported:
            every = self.noise_multipliers + reported
            self.noise_multipliers = [min(every), max(every)]

    def columns(self) -> dict[str, float | None]:
        largest = max(self.client_epsilons.values()) if self.client_epsilons else None
        return {**super().columns(), "max_client_epsilon": largest}

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        """The largest ε the server computed (``epsilon``), the largest a client reported, how
        many clients' reports disagree with the server's account (and the first few), and the
        source of the clients' noise."""
        p = config.privacy
        spent = max(self.client_epsilons.values()) if self.client_epsilons else 0.0
        return {"mode": "local", "epsilon": spent, "delta": p.delta,
                "accountant": p.accountant, "accountant_library": ACCOUNTANT_LIBRARY,
                "target_epsilon": p.target_epsilon or None,
                "noise_multiplier": p.noise_multiplier or None,
                "epsilon_accounted_by": "server (the σ it asked for, each client's sample rate "
                                        "from its training-set size, the steps its budget "
                                        "allowed)",
                "client_sizes_known": bool(self.client_sizes),
                "max_reported_epsilon": (max(self.reported_epsilons.values())
                                         if self.reported_epsilons else None),
                "clients_disagreeing": len(self.disagreements),
                "disagreements": dict(list(self.disagreements.items())[:5]),
                "client_noise_multipliers": (dict(zip(("min", "max"), self.noise_multipliers))
                                             if self.noise_multipliers else None),
                **noise_source(config)}


def _disagreement(metrics: Mapping[str, Any], noise: float, rate: float, steps: int,
                  spent: float) -> str:
    """How a client's report differs from what the server asked for ("" = it agrees)."""
    said = {"noise multiplier": (metrics.get(protocol.NOISE_MULTIPLIER), noise),
            "sample rate": (metrics.get(protocol.SAMPLE_RATE), rate),
            "steps": (metrics.get(protocol.NUM_STEPS), steps),
            "epsilon": (metrics.get(protocol.EPSILON), spent if math.isfinite(spent) else None)}
    for what, (reported, expected) in said.items():
        if reported is None and expected is None:
            continue
        if reported is None or expected is None or not math.isclose(
                float(reported), float(expected), rel_tol=1e-3, abs_tol=1e-9):
            return f"reported {what} {reported}, the server accounts {expected}"
    return ""


class LocalDP(PrivacyMode):
    """DP-SGD on every client, its accountant in the client's Context.state."""

    def check_data(self, config: Config, client_sizes: Sequence[int]) -> None:
        """δ must be below 1/n for every client's n examples (else releasing one is allowed).
        No sizes (the server of a files dataset sees no client data): each party checks its
        own."""
        if not client_sizes:
            return
        if not config.client.local_steps:  # local_epochs passes of ceil(n / batch) batches
            largest = max(client_sizes)
            steps = config.client.local_epochs * -(-largest // config.client.batch_size)
            check_prv_compositions(config, (config.privacy.client_rounds or config.run.rounds)
                                   * steps, "DP-SGD steps of the largest client")
        smallest = min(client_sizes)
        if config.privacy.delta >= 1 / smallest:
            raise ConfigError(
                f"privacy.delta = {config.privacy.delta:g} is not allowed: must be < 1/n = "
                f"{1 / smallest:g} for the smallest client's n = {smallest} training examples"
            )

    def server(self, config: Config, plan: PrivacyPlan, client_sizes: Sequence[int] = ()
               ) -> LocalServer:
        return LocalServer(config, client_sizes)

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              objective: GradientTerms | None) -> LocalTraining:
        """DP-SGD whose accountant history lives in ``state`` across rounds (the config refuses
        strategies with a client-side objective, so ``objective`` is None)."""
        config = resources.config
        loader = poisson_loader(resources.encoded, resources.federation.data.labels,
                                resources.client_train_rows(shard),
                                config.client.batch_size, seed, resources.model,
                                secure=not config.privacy.insecure_reproducible_noise)
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
