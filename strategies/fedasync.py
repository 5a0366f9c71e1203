"""FedAsync: asynchronous federated optimisation with staleness-weighted mixing.

Xie, Koyejo, Gupta. "Asynchronous Federated Optimization", 2019,
https://arxiv.org/abs/1903.03934 (Algorithm 1 and the staleness functions of Section 5.2).

The server mixes each client's model into the global model as it arrives:
``x <- (1 - a_t) x + a_t x_client`` with ``a_t = alpha * s(t - tau)``, where ``t - tau`` is the
update's staleness (server updates since the client fetched its model) and ``s`` is

- constant: ``s = 1``;
- polynomial: ``s(t - tau) = (t - tau + 1)^-a``;
- hinge: ``s = 1`` if ``t - tau <= b``, else ``1 / (a (t - tau - b) + 1)``.

Every arrival is one server update. Message protocol: FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.asynchronous import AsynchronousStrategy, NDArrays, same_dtype


def staleness_factor(kind: str, staleness: int, a: float, b: float) -> float:
    """FedAsync's s(t - tau) (Xie et al. 2019, Section 5.2)."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1.0) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown FedAsync staleness function {kind!r}")


class FedAsync(AsynchronousStrategy):
    """FedAsync with mixing weight ``alpha`` and staleness function ``staleness``."""

    def __init__(self, *, alpha: float = 0.6, staleness: str = "polynomial", a: float = 0.5,
                 b: float = 4, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        staleness_factor(staleness, 0, a, b)  # an unknown kind fails here, not mid-run
        self.alpha, self.staleness, self.a, self.b = alpha, staleness, a, b
        self.received: NDArrays = {}
        self.mixing = 0.0

    def prepare(self, start: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
                ) -> NDArrays:
        return {name: np.array(trained[name]) for name in start}

    def receive(self, kept: Mapping[str, np.ndarray], staleness: int, weight: float,
                client: int = -1) -> bool:
        self.received = dict(kept)
        self.mixing = self.alpha * staleness_factor(self.staleness, staleness, self.a, self.b)
        return True

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        mix = self.mixing
        new = {name: (1.0 - mix) * current[name].astype(np.float64)
               + mix * self.received[name].astype(np.float64) for name in current}
        self.received, self.mixing = {}, 0.0
        return same_dtype(new, current)
