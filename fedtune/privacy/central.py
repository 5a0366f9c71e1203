"""The server's privacy budget for user-level DP-FedAvg (McMahan et al. 2018).

Each round is one Poisson-subsampled Gaussian mechanism over clients: rate ``q`` =
``strategy.fraction_train``, noise multiplier ``σ`` (given, or the one that spends
``target_epsilon`` in ``run.rounds`` rounds). ``CentralBudget`` keeps the accountant history,
says whether one more round still fits the target, and reports ε after every round. The
mechanism itself (clip, noise, expected-cohort average) is ``strategies.dp_fedavg``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.dp_fedavg import DPFedAvg

from fedtune.config import Config, ConfigError
from fedtune.privacy.accounting import HistoryEntry, compose, epsilon, noise_for_target


@dataclass
class CentralBudget:
    noise_multiplier: float
    sample_rate: float
    delta: float
    mechanism: str
    target_epsilon: float = 0.0  # 0 = no target (noise_multiplier was given)
    history: list[HistoryEntry] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: Config) -> CentralBudget:
        p = config.privacy
        rate = config.strategy.fraction_train
        noise = p.noise_multiplier or noise_for_target(p.target_epsilon, p.delta, rate,
                                                       config.run.rounds, p.accountant)
        return cls(noise, rate, p.delta, p.accountant, p.target_epsilon)

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


def dp_fedavg(config: Config, **fedavg_args) -> DPFedAvg:
    """The DP-FedAvg strategy for this config (its noise is the budget's)."""
    p = config.privacy
    expected = config.strategy.fraction_train * config.data.num_clients
    strategy = DPFedAvg(
        sample_rate=config.strategy.fraction_train,
        noise_multiplier=CentralBudget.from_config(config).noise_multiplier,
        clipping_norm=p.clip_norm, adaptive=p.adaptive_clipping,
        target_quantile=p.target_quantile, clip_learning_rate=p.clip_lr,
        clipped_count_stddev=p.clipped_count_stddev or None, seed=config.run.seed,
        **fedavg_args,
    )
    strategy.population = config.data.num_clients
    if p.adaptive_clipping and strategy.noise_multiplier:
        count_std = p.clipped_count_stddev or expected / 20
        if strategy.noise_multiplier >= 2 * count_std:
            raise ConfigError(
                f"privacy.clipped_count_stddev = {count_std:g} is not allowed with noise "
                f"multiplier {strategy.noise_multiplier:.4g}: must be > noise / 2 "
                "(Andrew et al. 2021); raise it, or the expected cohort "
                "(fraction_train x num_clients)"
            )
    return strategy
