"""FedNova: normalised averaging of local updates.

Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020, https://arxiv.org/abs/2007.07481 (Section 4, eq. 9).

Clients that take more local steps move further; plain averaging then optimises a skewed
objective. FedNova divides each client's update by the l1 norm of its aggregation vector
``a_i`` (for ``tau_i`` plain SGD steps ``||a_i||_1 = tau_i``; with heavy-ball momentum ``rho``
``||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``, see
``local_normalizer``) and rescales the average by the effective number of steps:

    x <- x - tau_eff * sum_i p_i (x - y_i) / ||a_i||_1,    tau_eff = sum_i p_i ||a_i||_1,

with ``p_i = n_i / sum_j n_j`` over the clients of the round (``n_i``: local examples). With
equal step counts this is exactly FedAvg.

Message protocol for a ClientApp: the train config holds ``"fednova" = True``; the reply's
MetricRecord must hold ``"num-examples"`` and ``"fednova-a"`` (``||a_i||_1``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from strategies.records import (
    NDArray,
    check_replies,
    metric,
    require_configured,
    to_numpy,
    to_record,
)

REQUEST_KEY = "fednova"
NORMALIZER_KEY = "fednova-a"


def local_normalizer(num_steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` after ``num_steps`` local SGD steps with heavy-ball momentum ``momentum``.

    With PyTorch's momentum SGD (``buf = rho * buf + g``, fresh buffer each round) the gradient
    of step ``j`` of ``tau`` enters the update with weight ``a_j = (1 - rho^(tau-j+1)) / (1 - rho)``;
    ``||a||_1`` is their sum.
    """
    if num_steps < 0 or not 0 <= momentum < 1:
        raise ValueError(f"need num_steps >= 0 and 0 <= momentum < 1, got {num_steps}, {momentum}")
    if momentum == 0:
        return float(num_steps)
    rho = momentum
    return (num_steps - rho * (1 - rho**num_steps) / (1 - rho)) / (1 - rho)


class FedNova(FedAvg):
    """FedNova [Wang et al., 2020]; sampling and evaluation as in Flower's FedAvg.

    FedNova has no hyper-parameters of its own; ``**kwargs`` go to ``FedAvg``.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.global_arrays: dict[str, NDArray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages; the config asks clients to report ``||a_i||_1``."""
        self.global_arrays = to_numpy(arrays)
        config[REQUEST_KEY] = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        x = require_configured(self.global_arrays, "FedNova")
        contents = [message.content for message in valid]
        check_replies(contents, {self.arrayrecord_key: x}, [self.weighted_by_key, NORMALIZER_KEY])
        sizes = np.array([metric(c, self.weighted_by_key) for c in contents], dtype=np.float64)
        norms = np.array([metric(c, NORMALIZER_KEY) for c in contents], dtype=np.float64)
        if np.any(norms <= 0) or sizes.sum() <= 0:
            raise InconsistentMessageReplies(reason=f"FedNova needs '{NORMALIZER_KEY}' > 0 and "
                                                    "some examples in every round")
        p = sizes / sizes.sum()
        tau_eff = float(p @ norms)
        models = [to_numpy(content[self.arrayrecord_key]) for content in contents]
        new_x = {}
        for name, value in x.items():
            value64 = np.asarray(value, np.float64)
            direction = sum(p_i / a_i * (value64 - m[name]) for p_i, a_i, m
                            in zip(p, norms, models, strict=True))
            new_x[name] = value64 - tau_eff * direction
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(new_x, x), metrics
