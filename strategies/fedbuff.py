"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639 (Algorithm 1).

Clients train asynchronously from whatever model they fetched. The server keeps a buffer:
each client update ``delta_i = y_i - x_(t_i)`` (its model minus the model it started from) is
added weighted by its staleness ``s(tau) = 1 / sqrt(1 + tau)`` (tau = server updates since the
client fetched its model, the paper's choice); after ``K`` updates the server steps
``x <- x + server_lr * (1 / K) * sum_i s(tau_i) delta_i`` and empties the buffer. Every update
counts the same (the paper's mean over the buffer, not weighted by examples).

What the event loop hands over (``receive_trained``) is added as the paper's sum regrouped: the
updates that started from the same model ``x_v`` (so with the same staleness, within one server
update) are summed in arrival order - ``sum_i y_i``, one float64 addition of each float32
model into a sum that stays in cache (an ``OrderedSum``: by default at the end of the server
update, ``settle``; fedtune's event loop plugs in one that adds them as they arrive, in a
compiled loop, ``fedtune.server.kept_row_sums``) - and scaled once:
``s(tau) (sum_i y_i - n x_v)`` (``n x_v`` is exact in float64). The same sum as adding each
``s(tau_i) delta_i``, up to the order of float64 rounding (a group of one gives the same bits),
at a third of the memory traffic per update. A subclass whose
``prepare`` changes each update (DP-FedBuff clips it) receives each prepared update instead.

Message protocol: FedAvg's (``"arrays"`` out and back, a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from strategies.asynchronous import AsynchronousStrategy, NDArrays, OrderedSum, same_dtype


def staleness_weight(staleness: int) -> float:
    """FedBuff's staleness scaling 1 / sqrt(1 + tau) (IEEE's correctly rounded square root:
    the bits of ``np.sqrt``)."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class Arrivals:
    """The updates received since the last ``settle`` that started from one model ``start``
    with staleness weight ``scale``: how many, and their trained models' sum in arrival order
    (read-only models, alive until ``settle``)."""

    start: Mapping[str, np.ndarray]
    scale: float
    total: OrderedSum
    count: int = 0


class FedBuff(AsynchronousStrategy):
    """FedBuff with server learning rate ``server_lr`` and buffer size ``buffer_size`` (K)."""

    def __init__(self, *, buffer_size: int = 10, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.buffer: NDArrays = {}  # sum of s(tau_i) delta_i, float64
        self.buffered = 0
        # per start model received since the last ``settle`` (empty whenever a checkpoint
        # captures the state)
        self.arrived: list[Arrivals] = []

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

    def receive_trained(self, start: Mapping[str, np.ndarray],
                        trained: Mapping[str, np.ndarray], staleness: int, weight: float,
                        client: int = -1) -> bool:
        if type(self).prepare is not FedBuff.prepare:  # each update prepared on its own
            return super().receive_trained(start, trained, staleness, weight, client)
        scale = staleness_weight(staleness)
        for group in self.arrived:
            if group.start is start and group.scale == scale:
                break
        else:
            group = Arrivals(start, scale, self.ordered_sum(list(start)))
            self.arrived.append(group)
        group.total.add(trained)
        group.count += 1
        return self._counted()

    def settle(self) -> None:
        for group in self.arrived:
            sums = group.total.result()
            for name, start in group.start.items():
                total = sums[name]
                total -= np.multiply(start, group.count, dtype=np.float64)
                total *= group.scale
                self._add(name, total)
        self.arrived = []

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
        self.settle()
        step = self.server_lr / self.buffered
        new = {name: current[name] + step * self.buffer[name] for name in current}
        self.buffer, self.buffered = {}, 0
        return same_dtype(new, current)
