"""FLTrust's root dataset and the server's update on it (``strategy.name = "fltrust"``).

The root dataset is ``strategy.fltrust_root_examples`` rows drawn from the clients' pooled
training rows with ``run.seed``, as Cao et al. (2021) sample theirs from the training data: the
server holds a small clean sample of the task's distribution (the clients still hold these
examples too). Each round the server trains the global model on it exactly as a client trains
(``[client]`` settings, the round's seed) and hands FLTrust the update.
"""

from __future__ import annotations

import numpy as np

from fedtune.config import Config
from fedtune.data.loaders import train_loader
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.task import client_round_seed, seed_torch, task_resources
from fedtune.train import train_local

_ROOT_STREAM = 0xF1705
ROOT_CLIENT = -1  # the server's seed stream among the clients' (client_round_seed)


def root_rows(client_rows: tuple[np.ndarray, ...], count: int, seed: int) -> np.ndarray:
    """``count`` rows drawn from the clients' pooled training rows (all of them if fewer)."""
    pooled = np.concatenate(client_rows)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ROOT_STREAM]))
    return np.sort(rng.choice(pooled, size=min(count, len(pooled)), replace=False))


class RootTrainer:
    """``(x, round) -> g0``: the server's update on its root data."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self, global_arrays: dict[str, np.ndarray], server_round: int
                 ) -> dict[str, np.ndarray]:
        config = self.config
        resources = task_resources(config)
        federation = resources.federation
        rows = root_rows(federation.client_train_rows, config.strategy.fltrust_root_examples,
                         config.run.seed)
        seed = client_round_seed(config.run.seed, server_round, ROOT_CLIENT % 2**32)
        seed_torch(seed)
        model = resources.model
        load_shared_state(model, global_arrays)
        loader = train_loader(resources.encoded, federation.data.labels, rows,
                              config.client.batch_size, seed)
        train_local(model, loader, resources.train_settings, resources.device, None,
                    optimizer=resources.local_optimizer())
        trained = shared_state(model)
        return {name: trained[name].astype(np.float64) - value
                for name, value in global_arrays.items() if np.issubdtype(value.dtype,
                                                                          np.floating)}
