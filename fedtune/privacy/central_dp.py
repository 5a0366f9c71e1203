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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError
from fedtune.privacy.accounting import (
    ACCOUNTANT_LIBRARY,
    HistoryEntry,
    compose,
    epsilon,
    epsilon_by_accountants,
    noise_for_target,
)
from fedtune.privacy.mode import PrivacyMode, PrivacyPlan, PrivacyServer, noise_source
from fedtune.protocol import SECAGG_DP_CLIP_BOUND
from fedtune.tables import import_object
from fedtune.tables.strategies import STRATEGIES
from strategies import dp_fedavg
from strategies.dp_fedavg import COUNT_SENSITIVITY, DPFedAvg, adaptive_noise, count_share

if TYPE_CHECKING:
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy import Strategy

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

    def __init__(self, budget: CentralBudget, distributed: bool = False) -> None:
        self.budget = budget
        self.distributed = distributed  # SecAgg+: the clients add the noise
        self.clip_norm: float | None = None
        self.clipped_fraction: float | None = None
        self.noise_std: float | None = None
        self.participations: dict[str, int] = {}  # client -> rounds its update was summed
        self.quantiser_clip_bound = 0.0  # Σ η over the rounds (distributed DP)

    def stop_before(self, server_round: int) -> str:
        return "" if self.budget.next_round_fits() else self.budget.stop_reason(server_round)

    def record_round(self, rows: Sequence[ClientRow], accepted: Sequence[Mapping[str, Any]],
                     aggregated: MetricRecord | None = None) -> None:
        self.budget.record_round()
        for row in rows:
            if row.status == "ok" and row.client_id is not None:
                key = str(row.client_id)
                self.participations[key] = self.participations.get(key, 0) + 1
        reported = aggregated or {}
        self.quantiser_clip_bound += float(reported.get(SECAGG_DP_CLIP_BOUND, 0.0))
        self.clip_norm = _number(reported.get(dp_fedavg.CLIP_NORM))
        self.clipped_fraction = _number(reported.get(dp_fedavg.CLIPPED_FRACTION))
        self.noise_std = _number(reported.get(dp_fedavg.NOISE_STD))

    def columns(self) -> dict[str, float | None]:
        return {**super().columns(), "epsilon": self.budget.epsilon,
                "clip_norm": self.clip_norm, "clipped_fraction": self.clipped_fraction,
                "noise_std": self.noise_std}

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        """Everything a reader needs to recompute ε (docs/privacy.md has the recipe): σ, q,
        the rounds accounted, δ, the accountant; with adaptive clipping the update's and the
        count's noise multipliers and the count's sensitivity; ε of the composed mechanism by
        two accountants; where the noise came from; and the last bound used."""
        p = config.privacy
        rounds = sum(steps for _, _, steps in self.budget.history)
        composed = composed_noise_multiplier(plan.details, plan.noise_multiplier)
        return {"mode": "central", "epsilon": self.budget.epsilon, "delta": p.delta,
                "accountant": p.accountant, "accountant_library": ACCOUNTANT_LIBRARY,
                "target_epsilon": p.target_epsilon or None,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "rounds_accounted": rounds, **plan.details,
                "composed_noise_multiplier": composed,
                "epsilon_by_accountant": epsilon_by_accountants(
                    composed, plan.sample_rate, rounds, p.delta),
                **noise_source(config), "last_clip_norm": self.clip_norm,
                **({"distributed": self.distributed_summary(config, plan)}
                   if self.distributed else {})}

    def distributed_summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        """What distributed DP (SecAgg+) adds to the guarantee: who must add noise, the
        quantiser's clipping bound η and the δ it costs, and ε against the server itself,
        which samples the cohort and so knows who took part (no amplification by sampling:
        q = 1 over the most rounds any one client's update was summed)."""
        p = config.privacy
        spent = self.budget.epsilon
        most = max(self.participations.values(), default=0)
        against_server = epsilon([(plan.noise_multiplier, 1.0, most)], p.delta, p.accountant)
        return {
            "noise_shares": "each client adds N(0, (noise_multiplier x clip_norm)^2 / m_min); "
                            "a round sums at least m_min inputs or fails",
            "assumes": "every client whose input is summed adds its share (if only h do, the "
                       "multiplier is noise_multiplier x sqrt(h / m_min))",
            "quantiser_clip_probability": self.quantiser_clip_bound,
            "delta_with_quantiser": p.delta + (1 + math.exp(min(spent, 700)))
            * self.quantiser_clip_bound,
            "max_participations": most,
            "epsilon_against_server": against_server,
        }


def composed_noise_multiplier(details: Mapping[str, Any], noise: float) -> float:
    """The multiplier of the one Gaussian mechanism a round releases: the update sum (noise
    σ_Δ C on sensitivity C) and, with adaptive clipping, the centred count (noise σ_b on
    sensitivity 1/2) together, ``(σ_Δ⁻² + (Δ_b / σ_b)⁻²)^(-1/2)`` (= σ by the split)."""
    if not details.get("adaptive_clipping") or not noise:
        return noise
    update, count = details["update_noise_multiplier"], details["count_noise_multiplier"]
    return (update ** -2 + count ** -2) ** -0.5


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


# what the accountant assumes of an asynchronous strategy's releases (summary.json, docs)
RELEASE_ACCOUNTING = (
    "each buffer release is one Gaussian mechanism (noise multiplier sigma on a sum of "
    "sensitivity clip_norm: every client adds at most one clipped update, scaled by a staleness "
    "weight <= 1); every server update is accounted as a release whoever took part, without "
    "amplification by sampling (sample_rate = 1): which clients start when follows their "
    "devices, not a sampling the accountant could model; who runs when is treated as public")


class CentralDP(PrivacyMode):
    """User-level DP-FedAvg: the server clips, noises and accounts; clients train plainly.
    Under an asynchronous strategy with a ``dp_release`` (FedBuff), the strategy's own
    release is the mechanism: ``strategies.dp_fedbuff``."""

    def plan(self, config: Config) -> PrivacyPlan:
        p = config.privacy
        if STRATEGIES[config.strategy.name].asynchronous:
            # Gaussian mechanisms composed over the releases, no sampling (Mironov 2017)
            noise = p.noise_multiplier or noise_for_target(p.target_epsilon, p.delta, 1.0,
                                                           config.run.rounds, p.accountant)
            return PrivacyPlan(noise_multiplier=noise, sample_rate=1.0,
                               details={"adaptive_clipping": False,
                                        "release_accounting": RELEASE_ACCOUNTING})
        rate = config.strategy.fraction_train
        noise = p.noise_multiplier or noise_for_target(p.target_epsilon, p.delta, rate,
                                                       config.run.rounds, p.accountant)
        details: dict[str, Any] = {"adaptive_clipping": p.adaptive_clipping}
        if p.adaptive_clipping:
            cohort = rate * config.data.num_clients
            count_std = p.clipped_count_stddev
            if noise and count_std and noise * COUNT_SENSITIVITY >= count_std:
                raise ConfigError(
                    f"privacy.clipped_count_stddev = {count_std:g} is not allowed with noise "
                    f"multiplier {noise:.4g}: must be > noise / 2 (the count would take the "
                    "whole budget); set privacy.clipped_count_stddev = 0 and choose "
                    "privacy.count_budget_share (0 = automatic)"
                )
            update_noise, count_noise = adaptive_noise(noise, cohort, count_std or None,
                                                       p.count_budget_share)
            details.update(
                update_noise_multiplier=update_noise, clipped_count_stddev=count_noise,
                count_sensitivity=COUNT_SENSITIVITY,
                count_noise_multiplier=count_noise / COUNT_SENSITIVITY if noise else 0.0,
                count_budget_share=count_share(noise, count_noise) if noise else 0.0)
        return PrivacyPlan(noise_multiplier=noise, sample_rate=rate, details=details)

    def strategy(self, config: Config, plan: PrivacyPlan, evaluate_args: dict[str, Any]
                 ) -> Strategy:
        """DP-FedAvg replaces the aggregation (its noise is the plan's); the configured
        strategy's server optimizer steps on its noised mean. An asynchronous strategy is
        replaced by its entry's ``dp_release`` (DP-FedBuff), with the same noise source."""
        p = config.privacy
        seed = config.run.seed if p.insecure_reproducible_noise else None
        entry = STRATEGIES[config.strategy.name]
        if entry.asynchronous:
            return import_object(entry.dp_release)(
                noise_multiplier=plan.noise_multiplier, clipping_norm=p.clip_norm, seed=seed,
                canaries=p.audit_canaries if p.audit else 0, canary_seed=config.run.seed,
                **entry.arguments(config), **evaluate_args)
        strategy = DPFedAvg(
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            clipping_norm=p.clip_norm, adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile, clip_learning_rate=p.clip_lr,
            # the plan's σ_b, so the mechanism noises exactly what the summary records
            clipped_count_stddev=plan.details.get("clipped_count_stddev") or None,
            seed=seed, canaries=p.audit_canaries if p.audit else 0, canary_seed=config.run.seed,
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

    def server(self, config: Config, plan: PrivacyPlan, client_sizes: Sequence[int] = ()
               ) -> CentralServer:
        p = config.privacy
        return CentralServer(CentralBudget(plan.noise_multiplier, plan.sample_rate, p.delta,
                                           p.accountant, p.target_epsilon),
                             distributed=config.strategy.secure_aggregation)
