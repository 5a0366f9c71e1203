"""The interface every privacy mode implements (``fedtune.tables.privacy_modes.PRIVACY_MODES``).

A mode has two sides. Before the run and on the server: ``plan`` (fixed once, before any
worker starts: σ), ``check_data``, ``strategy`` (how it wraps or replaces the aggregation)
and ``server`` (its state during the run: stop rule, metrics.csv columns, summary.json part,
checkpointed with the run, so it holds plain values only). On each client: ``train`` (how local
training runs under it).
The base classes are the mode without privacy; a mode overrides what it changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.train import GradientTerms, TrainResult, train_local
from strategies.noise import INSECURE_SOURCE, SOURCE

if TYPE_CHECKING:
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy import Strategy

    from fedtune.config import Config
    from fedtune.results.run_dir import ClientRow
    from fedtune.task import TaskResources


# metrics.csv's privacy columns (``fedtune.results.run_dir.RoundRow``): ε of a central run, the
# largest client ε of a local run, and central DP's clipping bound, released share of clipped
# updates (noised; adaptive clipping only) and noise std per coordinate of the mean update
PRIVACY_COLUMNS = ("epsilon", "max_client_epsilon", "clip_norm", "clipped_fraction",
                   "noise_std")


def noise_source(config: Config) -> dict[str, Any]:
    """summary.json's statement of where a DP mode's noise came from, and whether the run is
    private at all (``privacy.insecure_reproducible_noise`` makes it not)."""
    insecure = config.privacy.insecure_reproducible_noise
    return {"private": not insecure, "noise_source": INSECURE_SOURCE if insecure else SOURCE}


@dataclass(frozen=True)
class PrivacyPlan:
    """What a mode fixed before the run started (summary.json records it)."""

    noise_multiplier: float | None = None  # σ of the run's mechanism (None: none, or per client)
    sample_rate: float | None = None  # q of the run's mechanism
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalTraining:
    """One client's local training under a privacy mode."""

    result: TrainResult
    metrics: dict[str, float] = field(default_factory=dict)  # extra reply metrics
    status: str | None = None  # the reply's STATUS reason ("" = ran in full); None = no record


class PrivacyServer:
    """The server's side of a mode during one run; its attributes go into checkpoints."""

    # the mechanism releases a (noised) model every round, even from no sound update
    releases_empty_rounds = False

    def stop_before(self, server_round: int) -> str:
        """Why ``server_round`` must not run ("" = it may)."""
        return ""

    def record_round(self, rows: Sequence[ClientRow], accepted: Sequence[Mapping[str, Any]],
                     aggregated: MetricRecord | None = None) -> None:
        """Account for a finished round (its client rows, the accepted clients' metrics and
        what the strategy's aggregation reported)."""

    def columns(self) -> dict[str, float | None]:
        """This mode's values of metrics.csv's privacy columns after the latest round."""
        return dict.fromkeys(PRIVACY_COLUMNS)

    def summary(self, config: Config, plan: PrivacyPlan) -> dict[str, Any]:
        """summary.json's "privacy" part."""
        return {"mode": config.privacy.mode, "epsilon": None, "delta": None, "accountant": None}


class PrivacyMode:
    """A privacy mode (the base class is the mode without privacy)."""

    def plan(self, config: Config) -> PrivacyPlan:
        """Fix what the whole run uses (σ); raise ConfigError for settings that cannot work."""
        return PrivacyPlan()

    def check_data(self, config: Config, client_sizes: Sequence[int]) -> None:
        """Checks that need the clients' training-set sizes (empty: the server does not know
        them, as with per-party files)."""

    def strategy(self, config: Config, plan: PrivacyPlan, evaluate_args: dict[str, Any]
                 ) -> Strategy | None:
        """A strategy that replaces the configured one (None: keep it)."""
        return None

    def server(self, config: Config, plan: PrivacyPlan, client_sizes: Sequence[int] = ()
               ) -> PrivacyServer:
        """The server's state for one run (``client_sizes``: the clients' training-set sizes
        where the server knows them, as ``check_data`` gets them)."""
        return PrivacyServer()

    def secure_sum_noise(self, config: Config, plan: PrivacyPlan) -> tuple[float, float]:
        """Under SecAgg+, the L2 bound each client clips its update to and the noise
        multiplier of the Gaussian noise the clients add together (distributed DP); (0, 0):
        the clients neither clip nor noise."""
        return 0.0, 0.0

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              objective: GradientTerms | None) -> LocalTraining:
        """Train the resident model on client ``shard``'s training split; ``state`` is the
        client's Context.state, ``objective`` its strategy's extra terms."""
        result = train_local(resources.model, resources.client_train_loader(shard, seed),
                             resources.train_settings, resources.device, objective,
                             optimizer=resources.local_optimizer())
        return LocalTraining(result)
