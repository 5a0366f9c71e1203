"""Build the configured Flower strategy from its table entry (``fedtune.tables.strategies``).

The entry names the class and turns ``[strategy]`` keys into constructor arguments; the privacy
mode may replace the strategy (central DP: DP-FedAvg). Every strategy waits for all clients to
connect before the first round.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedtune.config import Config
from fedtune.privacy.mode import PrivacyPlan
from fedtune.tables.privacy_modes import privacy_mode
from fedtune.tables.strategies import STRATEGIES, strategy_arguments


def evaluate_arguments(config: Config) -> dict[str, Any]:
    """Federated evaluation and availability settings every strategy takes."""
    s = config.strategy
    evaluate = s.fraction_evaluate > 0 and config.data.local_test_fraction > 0
    return {"fraction_evaluate": s.fraction_evaluate if evaluate else 0.0,
            "min_evaluate_nodes": 1 if evaluate else 0,
            "min_available_nodes": config.data.num_clients}


def build_strategy(config: Config, plan: PrivacyPlan) -> Strategy:
    """The configured strategy (``plan``: what the privacy mode fixed for the run)."""
    s = config.strategy
    evaluate_args = evaluate_arguments(config)
    replaced = privacy_mode(config).strategy(config, plan, evaluate_args)
    if replaced is not None:
        return replaced
    return STRATEGIES[s.name].load()(fraction_train=s.fraction_train, min_train_nodes=s.min_train_clients,
               **evaluate_args, **strategy_arguments(config))
