"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639 (Algorithm 1).

Clients train asynchronously from whatever model they fetched. The server keeps a buffer:
each client update ``delta_i = y_i - x_(t_i)`` (its model minus the model it started from) is
added weighted by its staleness ``s(tau) = 1 / sqrt(1 + tau)`` (tau = server updates since the
client fetched its model, the paper's choice); after ``K`` updates the server steps
``x <- x + server_lr * (1 / K) * sum_i s(tau_i) delta_i`` and empties the buffer. Every update
counts the same (the paper's mean over the buffer, not weighted by examples).

The event loop trains the clients it hears of in one server update together, one training
call per model they started from (``fedtune.server.async_loop``), so each call's updates share
one staleness. A call's trained models are summed where the clients trained - the cohort's
float64 sum, each weighted 1, in client order, read while the clients' chunk is fresh
(``fedtune.server.grid.CohortSpec.unit_weights``) - and handed over as ``receive_sum``: the
paper's sum regrouped, ``s(tau) (sum_i y_i - n x_v)`` (``n x_v`` is exact in float64). The
same sum as adding each ``s(tau_i) delta_i``, up to the order of float64 rounding, without
reading any update a second time. A subclass whose ``prepare`` changes each update
(DP-FedBuff clips it) sets ``takes_sums`` False and receives each prepared update instead.

Message protocol: FedAvg's (``"arrays"`` out and back, a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from strategies.asynchronous import AsynchronousStrategy, NDArrays, same_dtype


def staleness_weight(staleness: int) -> float:
    """FedBuff's staleness scaling 1 / sqrt(1 + tau) (IEEE's correctly rounded square root:
    the bits of ``np.sqrt``)."""
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(AsynchronousStrategy):
    """FedBuff with server learning rate ``server_lr`` and buffer size ``buffer_size`` (K)."""

    takes_sums = True

    def __init__(self, *, buffer_size: int = 10, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.buffer: NDArrays = {}  # sum of s(tau_i) delta_i, float64
        self.buffered = 0

    def prepare(self, start: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
                ) -> NDArrays:
        deltas = {name: trained[name].astype(np.float64) for name in start}
        for name, delta in deltas.items():  # in place: one float64 array per tensor
            delta -= start[name]
        return deltas

    def receive(self, kept: Mapping[str, np.ndarray], staleness: int, weight: float,
                client: int = -1) -> bool:
        scale = staleness_weight(staleness)
        for name, delta in kept.items():
            self._add(name, scale * delta)
        return self._counted()

    def receive_sum(self, start: Mapping[str, np.ndarray], total: Mapping[str, np.ndarray],
                    count: int, staleness: int) -> bool:
        scale = staleness_weight(staleness)
        for name, model in start.items():
            group = np.array(total[name], dtype=np.float64)
            group -= np.multiply(model, count, dtype=np.float64)
            group *= scale
            self._add(name, group)
        self.buffered += count
        return self.buffered >= self.buffer_size

    def wanted(self) -> int:
        return self.buffer_size - self.buffered

    def _add(self, name: str, scaled: np.ndarray) -> None:
        """``scaled`` (float64, s(tau) times an update or a group's sum) into the buffer's
        ``name``: in place, the same float64 arithmetic (the first one is kept as it is)."""
        if name in self.buffer:
            self.buffer[name] += scaled
        else:
            self.buffer[name] = scaled

    def _counted(self) -> bool:
        """Count one more update in the buffer; True when it is full (the server updates)."""
        self.buffered += 1
        return self.buffered >= self.buffer_size

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        step = self.server_lr / self.buffered
        new = {name: current[name] + step * self.buffer[name] for name in current}
        self.buffer, self.buffered = {}, 0
        return same_dtype(new, current)
