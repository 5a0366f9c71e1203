"""SCAFFOLD: stochastic controlled averaging.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, https://arxiv.org/abs/1910.06378 (Algorithm 1, option II).

Control variates correct the drift of non-IID clients. The server keeps the model ``x`` and a
control variate ``c``; each client ``i`` keeps its own ``c_i`` (zero at first) across rounds.

- Server sends ``x`` and ``c``.
- Client: ``y = x``; ``K`` local SGD steps with the corrected gradient
  ``y <- y - lr * (g_i(y) - c_i + c)``; then ``c_i+ = c_i - c + (x - y) / (K * lr)`` (option II);
  replies ``y`` and ``delta_c_i = c_i+ - c_i`` and keeps ``c_i <- c_i+``
  (``client_control_update`` does this step in NumPy).
- Server: ``x <- x + server_lr * mean_i (y_i - x)`` and ``c <- c + (1 / N) * sum_i delta_c_i``,
  with ``N`` the number of all clients (connected nodes), not just the sampled ones.

Message protocol for a ClientApp: the train message holds the ArrayRecords ``"arrays"`` (x) and
``"scaffold-control"`` (c, floating-point arrays only); the reply must hold ``"arrays"`` (y),
``"scaffold-control-delta"`` (delta_c_i, same names as c) and one MetricRecord with
``"num-examples"`` (used to weight the training metrics only; the paper's model average is
unweighted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.records import (
    NDArray,
    check_replies,
    floating,
    require_configured,
    to_numpy,
    to_record,
    zeros_like,
)

CONTROL_KEY = "scaffold-control"
CONTROL_DELTA_KEY = "scaffold-control-delta"


def client_control_update(client_control: Mapping[str, NDArray],
                          server_control: Mapping[str, NDArray],
                          global_arrays: Mapping[str, NDArray], local_arrays: Mapping[str, NDArray],
                          num_steps: int, lr: float) -> tuple[dict[str, NDArray], dict[str, NDArray]]:
    """Option II of Algorithm 1: ``(c_i+, c_i+ - c_i)`` for every array named in ``server_control``."""
    if num_steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs num_steps >= 1 and lr > 0, got {num_steps} and {lr}")
    new, delta = {}, {}
    for name, c in server_control.items():
        drift = (np.asarray(global_arrays[name], np.float64)
                 - np.asarray(local_arrays[name], np.float64)) / (num_steps * lr)
        updated = np.asarray(client_control[name], np.float64) - c + drift
        new[name] = updated.astype(c.dtype)
        delta[name] = (updated - client_control[name]).astype(c.dtype)
    return new, delta


class Scaffold(FedAvg):
    """SCAFFOLD [Karimireddy et al., 2020]; sampling and evaluation as in Flower's FedAvg.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Global step size ``eta_g``; the paper's experiments use 1.
    **kwargs
        Passed to ``FedAvg`` (fraction_train, min_train_nodes, weighted_by_key, ...).
    """

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.control: dict[str, NDArray] | None = None
        self.global_arrays: dict[str, NDArray] | None = None
        self.num_nodes = 0

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD settings:")
        log(INFO, "\t│\t└── server_lr: %s", self.server_lr)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, each also carrying the server control variate ``c``."""
        self.global_arrays = to_numpy(arrays)
        if self.control is None:
            self.control = zeros_like(floating(self.global_arrays))
        self.num_nodes = len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control, self.control)
        for message in messages:
            message.content[CONTROL_KEY] = control
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        x = require_configured(self.global_arrays, "SCAFFOLD")
        control = require_configured(self.control, "SCAFFOLD")
        contents = [message.content for message in valid]
        check_replies(contents, {self.arrayrecord_key: x, CONTROL_DELTA_KEY: control},
                      [self.weighted_by_key])
        models = [to_numpy(content[self.arrayrecord_key]) for content in contents]
        deltas = [to_numpy(content[CONTROL_DELTA_KEY]) for content in contents]
        new_x = {}
        for name, value in x.items():
            mean_step = np.mean([np.asarray(m[name], np.float64) - value for m in models], axis=0)
            new_x[name] = value + self.server_lr * mean_step
        total_nodes = max(self.num_nodes, len(valid))
        self.control = {
            name: (c + np.sum([d[name].astype(np.float64) for d in deltas], axis=0)
                   / total_nodes).astype(c.dtype)
            for name, c in control.items()
        }
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(new_x, x), metrics
