"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639 (Algorithm 1).

Clients train asynchronously from whatever model they fetched. The server keeps a buffer:
each client update ``delta_i = y_i - x_(t_i)`` (its model minus the model it started from) is
added weighted by its staleness ``s(tau) = 1 / sqrt(1 + tau)`` (tau = server updates since the
client fetched its model, the paper's choice); after ``K`` updates the server steps
``x <- x + server_lr * (1 / K) * sum_i s(tau_i) delta_i`` and empties the buffer. Every update
counts the same (the paper's mean over the buffer, not weighted by examples).

Message protocol: FedAvg's (``"arrays"`` out and back, a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.asynchronous import AsynchronousStrategy, NDArrays, same_dtype


def staleness_weight(staleness: int) -> float:
    """FedBuff's staleness scaling 1 / sqrt(1 + tau)."""
    return 1.0 / float(np.sqrt(1.0 + staleness))


class FedBuff(AsynchronousStrategy):
    """FedBuff with server learning rate ``server_lr`` and buffer size ``buffer_size`` (K)."""

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
            if name in self.buffer:
                self.buffer[name] += scale * delta  # in place, the same float64 arithmetic
            else:
                self.buffer[name] = scale * delta
        self.buffered += 1
        return self.buffered >= self.buffer_size

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        step = self.server_lr / self.buffered
        new = {name: current[name] + step * self.buffer[name] for name in current}
        self.buffer, self.buffered = {}, 0
        return same_dtype(new, current)
