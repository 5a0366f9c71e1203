"""``privacy.mode = "central"``: user-level DP-FedAvg at the server (McMahan et al. 2018).

Each round is one Poisson-subsampled Gaussian mechanism over clients: rate ``q`` =
``strategy.fraction_train``, noise multiplier ``σ`` (given, or the one that spends
``target_epsilon`` in ``run.rounds`` rounds; fixed once in the plan). ``CentralBudget`` keeps
the accountant history, says whether one more round still fits the target, and reports ε after
every round. The mechanism itself (clip, noise, expected-cohort average, adaptive clipping
after Andrew et al. 2021) is ``strategies.dp_fedavg``. Clients train as without privacy; with
``strategy.secure_aggregation`` the DP is distributed: each client clips its update and adds its
share of the noise before SecAgg+ masks it (``fedtune.client.secagg``), and the server, which
sees only the sum, neither clips nor noises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError
from fedtune.privacy.accounting import HistoryEntry, compose, epsilon, noise_for_target
from fedtune.privacy.mode import PrivacyMode, PrivacyPlan, PrivacyServer
from strategies.dp_fedavg import DPFedAvg

if TYPE_CHECKING:
    from flwr.app import Message

    from fedtune.config import Config
    from fedtune.results.run_dir import ClientRow


@dataclass
class CentralBudget:
    """The run's accountant: one Poisson-subsampled Gaussian mechanism per round."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    mechanism: str
    target_epsilon: float = 0.0  # 0 = no target (noise_multiplier was given)
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, self.delta, self.mechanism)

    def epsilon_after_next(self) -> float:
        return epsilon(compose(self.history, self.noise_multiplier, self.sample_rate, 1),
                       self.delta, self.mechanism)

    def next_round_fits(self) -> bool:
        return not self.target_epsilon or self.epsilon_after_next() <= self.target_epsilon

    def record_round(self) -> None:
        self.history = compose(self.history, self.noise_multiplier, self.sample_rate, 1)

    def stop_reason(self, server_round: int) -> str:
        return (f"privacy budget: stopped before round {server_round}: it would take epsilon "
                f"from {self.epsilon:.4g} to {self.epsilon_after_next():.4g}, above "
                f"privacy.target_epsilon = {self.target_epsilon:g}")


class CentralServer(PrivacyServer):
    """DP-FedAvg's server side: the budget decides whether a round may run, and the noised
    aggregate is released (and accounted) every round, even from an empty cohort."""

    releases_empty_rounds = True

    def __init__(self, budget: CentralBudget) -> None:
        self.budget = budget

    def stop_before(self, server_round: int) -> str:
        return "" if self.budget.next_round_fits() else self.budget.stop_reason(server_round)

    def record_round(self, rows: Sequence[ClientRow], replies: Sequence[Message]) -> None:
        self.budget.record_round()

    def columns(self) -> dict[str, float | None]:
        return {"epsilon": self.budget.epsilon, "max_client_epsilon": None}

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        p = config.privacy
        return {"mode": "central", "epsilon": self.budget.epsilon, "delta": p.delta,
                "accountant": p.accountant, "target_epsilon": p.target_epsilon or None,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "rounds_accounted": sum(steps for _, _, steps in self.budget.history)}


class CentralDP(PrivacyMode):
    """User-level DP-FedAvg: the server clips, noises and accounts; clients train plainly."""

    def plan(self, config: Config) -> PrivacyPlan:
        p = config.privacy
        rate = config.strategy.fraction_train
        noise = p.noise_multiplier or noise_for_target(p.target_epsilon, p.delta, rate,
                                                       config.run.rounds, p.accountant)
        if p.adaptive_clipping and noise:
            count_std = p.clipped_count_stddev or rate * config.data.num_clients / 20
            if noise >= 2 * count_std:
                raise ConfigError(
                    f"privacy.clipped_count_stddev = {count_std:g} is not allowed with noise "
                    f"multiplier {noise:.4g}: must be > noise / 2 (Andrew et al. 2021); raise "
                    "it, or the expected cohort (fraction_train x num_clients)"
                )
        return PrivacyPlan(noise_multiplier=noise, sample_rate=rate)

    def strategy(self, config: Config, plan: PrivacyPlan, evaluate_args: dict[str, Any]
                 ) -> DPFedAvg:
        """DP-FedAvg replaces the aggregation (its noise is the plan's)."""
        p = config.privacy
        strategy = DPFedAvg(
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            clipping_norm=p.clip_norm, adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile, clip_learning_rate=p.clip_lr,
            clipped_count_stddev=p.clipped_count_stddev or None, seed=config.run.seed,
            client_noise=config.strategy.secure_aggregation, **evaluate_args,
        )
        strategy.population = config.data.num_clients
        return strategy

    def server(self, config: Config, plan: PrivacyPlan) -> CentralServer:
        p = config.privacy
        return CentralServer(CentralBudget(plan.noise_multiplier, plan.sample_rate, p.delta,
                                           p.accountant, p.target_epsilon))
