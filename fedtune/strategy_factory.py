"""Build the configured Flower strategy."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from fedtune.config import Config


def build_strategy(config: Config) -> Strategy:
    """A Flower strategy that waits for every client to connect before any round starts."""
    s = config.strategy
    num_clients = config.data.num_clients
    evaluate = s.fraction_evaluate > 0 and config.data.local_test_fraction > 0
    evaluation = {"fraction_evaluate": s.fraction_evaluate if evaluate else 0.0,
                  "min_evaluate_nodes": 1 if evaluate else 0,
                  "min_available_nodes": num_clients}
    if config.privacy.mode == "central":
        from fedtune.privacy.central import dp_fedavg

        return dp_fedavg(config, **evaluation)
    return FedAvg(fraction_train=s.fraction_train, min_train_nodes=s.min_train_clients,
                  **evaluation)
