"""Build the configured Flower strategy from its table entry (``fedtune.tables.strategies``).

The entry names the class and turns ``[strategy]`` keys into constructor arguments; the privacy
mode may replace the strategy (central DP: DP-FedAvg); ``strategy.secure_aggregation`` wraps
it in SecAgg+ (``fedtune.server.secagg_plus``). Every strategy waits for all clients to connect
before the first round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedtune.config import Config, clients_per_round
from fedtune.privacy.mode import PrivacyPlan
from fedtune.protocol import MAX_ANY_EXAMPLES
from fedtune.server.secagg_plus import SecAggPlus, SecAggSettings
from fedtune.tables.devices import devices_on, sampled_per_round
from fedtune.tables.privacy_modes import PRIVACY_MODES, privacy_mode
from fedtune.tables.strategies import STRATEGIES, strategy_arguments


def evaluate_arguments(config: Config) -> dict[str, Any]:
    """Federated evaluation and availability settings every strategy takes."""
    s = config.strategy
    evaluate = s.fraction_evaluate > 0 and config.data.local_test_fraction > 0
    return {"fraction_evaluate": s.fraction_evaluate if evaluate else 0.0,
            "min_evaluate_nodes": 1 if evaluate else 0,
            # with devices the round samples from the available clients only
            # (fedtune.server.device_rounds); every client connected before the first round
            "min_available_nodes": 1 if devices_on(config) else config.data.num_clients}


def build_strategy(config: Config, plan: PrivacyPlan,
                   max_examples: int = MAX_ANY_EXAMPLES, kept: Sequence[str] = ()) -> Strategy:
    """The configured strategy (``plan``: what the privacy mode fixed for the run;
    ``max_examples``: the federation's training examples, where the server knows them;
    ``kept``: a personalised strategy's personal part, which SecAgg+ leaves out of the sum)."""
    s = config.strategy
    evaluate_args = evaluate_arguments(config)
    mode = privacy_mode(config)
    strategy = mode.strategy(config, plan, evaluate_args)
    if strategy is None:
        per_round = (sampled_per_round(config, clients_per_round(config))
                     if devices_on(config) else s.min_train_clients)
        entry = STRATEGIES[s.name]
        strategy = entry.load()(
            fraction_train=s.fraction_train, min_train_nodes=per_round,
            **evaluate_args, **strategy_arguments(config), **entry.components(config))
    if not s.secure_aggregation:
        return strategy
    entry = STRATEGIES[s.name]
    dp_clip, dp_noise_multiplier = mode.secure_sum_noise(config, plan)
    return SecAggPlus(strategy, SecAggSettings(
        degree=s.secagg_degree, threshold=s.secagg_threshold, bits=s.secagg_bits,
        clip_range=s.secagg_clip_range, timeout_s=s.round_timeout_s, seed=config.run.seed,
        sum_weight=PRIVACY_MODES[config.privacy.mode].sum_weight or entry.sum_weight,
        answers=dict(entry.answers), max_weight=max_examples, dp_clip=dp_clip,
        dp_noise_multiplier=dp_noise_multiplier, kept=tuple(kept)))
