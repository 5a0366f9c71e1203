"""Build the configured Flower strategy: Flower's own classes, or the ones in ``strategies/``.

``strategy_hyperparameters`` maps the ``[strategy]`` keys that apply to the chosen strategy
onto its constructor's arguments; keys for other strategies are ignored (and not recorded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import Strategy

import strategies
from fedtune.config import Config, StrategySection, clients_per_round

CLASSES: dict[str, type[Strategy]] = {
    "fedavg": flower.FedAvg,
    "fedprox": flower.FedProx,
    "fedavgm": flower.FedAvgM,
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedadagrad": flower.FedAdagrad,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "fedmedian": flower.FedMedian,
    "krum": flower.Krum,
    "multikrum": flower.MultiKrum,
    "scaffold": strategies.Scaffold,
    "fednova": strategies.FedNova,
    "feddyn": strategies.FedDyn,
    "rfa": strategies.RFA,
}


def _fedopt(s: StrategySection, config: Config) -> dict[str, Any]:
    # eta_l is the clients' learning rate; Flower's FedOpt only stores it
    return {"eta": s.fedopt_eta, "eta_l": config.client.lr, "beta_1": s.fedopt_beta_1,
            "beta_2": s.fedopt_beta_2, "tau": s.fedopt_tau}


HYPERPARAMETERS: dict[str, Callable[[StrategySection, Config], dict[str, Any]]] = {
    "fedavg": lambda s, c: {},
    "fedprox": lambda s, c: {"proximal_mu": s.proximal_mu},
    "fedavgm": lambda s, c: {"server_learning_rate": s.server_lr,
                             "server_momentum": s.server_momentum},
    "fedadam": _fedopt,
    "fedyogi": _fedopt,
    "fedadagrad": lambda s, c: {"eta": s.fedopt_eta, "eta_l": c.client.lr, "tau": s.fedopt_tau},
    "fedtrimmedavg": lambda s, c: {"beta": s.trim_beta},
    "fedmedian": lambda s, c: {},
    "krum": lambda s, c: {"num_malicious_nodes": s.num_malicious},
    "multikrum": lambda s, c: {
        "num_malicious_nodes": s.num_malicious,
        "num_nodes_to_select": s.multikrum_select or clients_per_round(c) - s.num_malicious,
    },
    "scaffold": lambda s, c: {"server_lr": s.server_lr},
    "fednova": lambda s, c: {},
    "feddyn": lambda s, c: {"alpha": s.feddyn_alpha},
    "rfa": lambda s, c: {"iterations": s.rfa_iterations, "smoothing": s.rfa_smoothing},
}


def strategy_hyperparameters(config: Config) -> dict[str, Any]:
    """Constructor arguments of the chosen strategy taken from ``[strategy]``."""
    return HYPERPARAMETERS[config.strategy.name](config.strategy, config)


def build_strategy(config: Config) -> Strategy:
    """The configured strategy; it waits for every client to connect before any round starts."""
    s = config.strategy
    evaluate = s.fraction_evaluate > 0 and config.data.local_test_fraction > 0
    if config.privacy.mode == "central":  # DP-FedAvg replaces the aggregation
        from fedtune.privacy.central import dp_fedavg

        return dp_fedavg(config, fraction_evaluate=s.fraction_evaluate if evaluate else 0.0,
                         min_evaluate_nodes=1 if evaluate else 0,
                         min_available_nodes=config.data.num_clients)
    return CLASSES[s.name](
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate if evaluate else 0.0,
        min_train_nodes=s.min_train_clients,
        min_evaluate_nodes=1 if evaluate else 0,
        min_available_nodes=config.data.num_clients,
        **strategy_hyperparameters(config),
    )
