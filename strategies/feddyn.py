"""FedDyn: federated learning with dynamic regularisation.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama. "Federated Learning Based on Dynamic
Regularization", ICLR 2021, https://arxiv.org/abs/2111.04263 (Algorithm 1).

Each client ``k`` keeps the gradient state ``g_k`` (zero at first; it equals
``grad L_k(theta_k)`` at the client's last solution) and minimises

    L_k(theta) - <g_k, theta> + alpha / 2 * ||theta - x||^2,

then updates ``g_k <- g_k - alpha * (theta_k - x)`` (``client_gradient_update``). The server keeps
``h`` (zero at first) and, with ``m`` the number of all clients and ``P`` the sampled ones,

    h <- h - alpha / m * sum_{k in P} (theta_k - x),    x <- mean_{k in P} theta_k - h / alpha.

The regulariser makes the clients' stationary points agree with the global one, so local
drift does not bias the global model however many local steps are taken.

Message protocol for a ClientApp: the train config holds ``"feddyn-alpha"``; the reply holds
``"arrays"`` (theta_k) and one MetricRecord with ``"num-examples"`` (the model average is
unweighted, as in the paper; the weight is used for the training metrics only).
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
)

ALPHA_KEY = "feddyn-alpha"


def client_gradient_update(gradient_state: Mapping[str, NDArray],
                           local_arrays: Mapping[str, NDArray],
                           global_arrays: Mapping[str, NDArray], alpha: float) -> dict[str, NDArray]:
    """The client's new ``g_k = g_k - alpha * (theta_k - x)`` for every array of ``gradient_state``."""
    return {
        name: (np.asarray(g, np.float64) - alpha * (np.asarray(local_arrays[name], np.float64)
                                                    - global_arrays[name])).astype(g.dtype)
        for name, g in gradient_state.items()
    }


class FedDyn(FedAvg):
    """FedDyn [Acar et al., 2021]; sampling and evaluation as in Flower's FedAvg.

    Parameters
    ----------
    alpha : float (default: 0.01)
        Weight of the dynamic regulariser; the paper searches {0.1, 0.01, 0.001}.
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(self, *, alpha: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.h: dict[str, NDArray] | None = None
        self.global_arrays: dict[str, NDArray] | None = None
        self.num_nodes = 0

    def summary(self) -> None:
        log(INFO, "\t├──> FedDyn settings:")
        log(INFO, "\t│\t└── alpha: %s", self.alpha)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages; the config carries ``alpha`` for the client's regulariser."""
        self.global_arrays = to_numpy(arrays)
        if self.h is None:
            self.h = {name: np.zeros(value.shape, np.float64)
                      for name, value in floating(self.global_arrays).items()}
        self.num_nodes = len(list(grid.get_node_ids()))
        config[ALPHA_KEY] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        x = require_configured(self.global_arrays, "FedDyn")
        h = require_configured(self.h, "FedDyn")
        contents = [message.content for message in valid]
        check_replies(contents, {self.arrayrecord_key: x}, [self.weighted_by_key])
        models = [to_numpy(content[self.arrayrecord_key]) for content in contents]
        total_nodes = max(self.num_nodes, len(valid))
        new_x = {}
        for name, value in x.items():
            mean = np.mean([np.asarray(m[name], np.float64) for m in models], axis=0)
            if name in h:
                h[name] = h[name] - self.alpha / total_nodes * np.sum(
                    [np.asarray(m[name], np.float64) - value for m in models], axis=0)
                mean = mean - h[name] / self.alpha
            new_x[name] = mean
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(new_x, x), metrics
