"""``privacy.mode = "central"``: user-level DP-FedAvg at the server (McMahan et al. 2018).

Each round is one Poisson-subsampled Gaussian mechanism over clients: rate ``q`` =
``strategy.fraction_train``, noise multiplier ``σ`` (given, or the one that spends
``target_epsilon`` in ``run.rounds`` rounds; fixed once in the plan). ``CentralBudget`` keeps
the accountant history, says whether one more round still fits the target, and reports ε after
every round. The mechanism itself (clip, noise, expected-cohort average, adaptive clipping
after Andrew et al. 2021, canary clients for the audit) is ``strategies.dp_fedavg``; the
configured strategy picks the server optimizer on its noised mean (fedavg: plain DP-FedAvg,
fedavgm: DP-FedAvgM, fedadam: DP-FedAdam). Clients train as without privacy; with
``strategy.secure_aggregation`` the DP is distributed: each client clips its update and adds its
share of the noise before SecAgg+ masks it (``fedtune.client.secagg_stages``), and the server, which
sees only the sum, neither clips nor noises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError
from fedtune.privacy.accounting import (
    ACCOUNTANT_LIBRARY,
    HistoryEntry,
    compose,
    epsilon,
    noise_for_target,
)
from fedtune.privacy.mode import PrivacyMode, PrivacyPlan, PrivacyServer
from fedtune.tables.strategies import STRATEGIES
from strategies import dp_fedavg
from strategies.dp_fedavg import DPFedAvg, adaptive_noise

if TYPE_CHECKING:
    from flwr.app import MetricRecord

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
    aggregate is released (and accounted) every round, even from an empty cohort. It keeps
    the latest round's clipping bound, released clipped share and noise std for metrics.csv."""

    releases_empty_rounds = True

    def __init__(self, budget: CentralBudget) -> None:
        self.budget = budget
        self.clip_norm: float | None = None
        self.clipped_fraction: float | None = None
        self.noise_std: float | None = None

    def stop_before(self, server_round: int) -> str:
        return "" if self.budget.next_round_fits() else self.budget.stop_reason(server_round)

    def record_round(self, rows: Sequence[ClientRow], accepted: Sequence[Mapping[str, Any]],
                     aggregated: MetricRecord | None = None) -> None:
        self.budget.record_round()
        reported = aggregated or {}
        self.clip_norm = _number(reported.get(dp_fedavg.CLIP_NORM))
        self.clipped_fraction = _number(reported.get(dp_fedavg.CLIPPED_FRACTION))
        self.noise_std = _number(reported.get(dp_fedavg.NOISE_STD))

    def columns(self) -> dict[str, float | None]:
        return {**super().columns(), "epsilon": self.budget.epsilon,
                "clip_norm": self.clip_norm, "clipped_fraction": self.clipped_fraction,
                "noise_std": self.noise_std}

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        """σ, q, rounds, δ, ε and the accountant that computed ε; with adaptive clipping also
        the two noise multipliers σ_Δ and σ_b that share σ, and the last bound used."""
        p = config.privacy
        return {"mode": "central", "epsilon": self.budget.epsilon, "delta": p.delta,
                "accountant": p.accountant, "accountant_library": ACCOUNTANT_LIBRARY,
                "target_epsilon": p.target_epsilon or None,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "rounds_accounted": sum(steps for _, _, steps in self.budget.history),
                **plan.details, "last_clip_norm": self.clip_norm}


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def server_optimizer(config: Config) -> dict[str, Any]:
    """The server optimizer the configured strategy runs on the noised mean (DPFedAvg's
    arguments), as its table entry's ``dp_server_optimizer`` says: FedAvg = SGD with rate 1,
    FedAvgM = SGD with momentum, FedAdam = Adam."""
    optimizer = STRATEGIES[config.strategy.name].dp_server_optimizer
    if optimizer is None:  # the config check refuses such a strategy first
        raise ConfigError(f"strategy.name = {config.strategy.name!r} is not allowed with "
                          "privacy.mode = 'central'")
    return optimizer(config)


class CentralDP(PrivacyMode):
    """User-level DP-FedAvg: the server clips, noises and accounts; clients train plainly."""

    def plan(self, config: Config) -> PrivacyPlan:
        p = config.privacy
        rate = config.strategy.fraction_train
        noise = p.noise_multiplier or noise_for_target(p.target_epsilon, p.delta, rate,
                                                       config.run.rounds, p.accountant)
        details: dict[str, Any] = {"adaptive_clipping": p.adaptive_clipping}
        if p.adaptive_clipping:
            cohort = rate * config.data.num_clients
            count_std = p.clipped_count_stddev or cohort / 20
            if noise and noise >= 2 * count_std:
                raise ConfigError(
                    f"privacy.clipped_count_stddev = {count_std:g} is not allowed with noise "
                    f"multiplier {noise:.4g}: must be > noise / 2 (Andrew et al. 2021); raise "
                    "it, or the expected cohort (fraction_train x num_clients), or set "
                    "privacy.adaptive_clipping = false with a fixed privacy.clip_norm"
                )
            update_noise, count_noise = adaptive_noise(noise, cohort,
                                                       p.clipped_count_stddev or None)
            details.update(update_noise_multiplier=update_noise,
                           clipped_count_stddev=count_noise)
        return PrivacyPlan(noise_multiplier=noise, sample_rate=rate, details=details)

    def strategy(self, config: Config, plan: PrivacyPlan, evaluate_args: dict[str, Any]
                 ) -> DPFedAvg:
        """DP-FedAvg replaces the aggregation (its noise is the plan's); the configured
        strategy's server optimizer steps on its noised mean."""
        p = config.privacy
        strategy = DPFedAvg(
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            clipping_norm=p.clip_norm, adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile, clip_learning_rate=p.clip_lr,
            clipped_count_stddev=p.clipped_count_stddev or None, seed=config.run.seed,
            canaries=p.audit_canaries if p.audit else 0, canary_seed=config.run.seed,
            client_noise=config.strategy.secure_aggregation,
            **server_optimizer(config), **evaluate_args,
        )
        strategy.population = config.data.num_clients
        return strategy

    def secure_sum_noise(self, config: Config, plan: PrivacyPlan) -> tuple[float, float]:
        """Distributed DP under SecAgg+: each client clips to ``privacy.clip_norm`` and adds
        its share of the plan's noise (``fedtune.client.secagg_stages``)."""
        if not config.strategy.secure_aggregation:
            return 0.0, 0.0
        return config.privacy.clip_norm, plan.noise_multiplier or 0.0

    def server(self, config: Config, plan: PrivacyPlan) -> CentralServer:
        p = config.privacy
        return CentralServer(CentralBudget(plan.noise_multiplier, plan.sample_rate, p.delta,
                                           p.accountant, p.target_epsilon))
