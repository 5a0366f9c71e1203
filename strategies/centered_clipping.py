"""Centred clipping: a robust aggregate that starts from the previous round's.

Karimireddy, He, Jaggi. "Learning from History for Byzantine Robust Optimization", ICML 2021,
https://arxiv.org/abs/2012.10333 (Algorithm 2). The server keeps ``v``, the last aggregate
update (its momentum, the "history"), and refines it ``iterations`` times from the updates
``Δ_i = w_i - x`` of the round:

    v <- v + 1/n sum_i (Δ_i - v) min(1, tau / ||Δ_i - v||)

then moves the model to ``x + v``. An update farther than ``tau`` from the history pulls with
at most ``tau``, so ``f`` attackers move the aggregate by at most ``f tau / n`` per iteration
whatever they send. The mean is unweighted, as in the paper. The paper's clients send
momentum; fedtune's clients send multi-step local updates, the federated analogue. Özfatura et
al. (2022) show adaptive attacks that stay within ``tau`` of the history and steer it.

Message protocol: as FedAvg (``"arrays"`` and a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from strategies.records import NDArray, UpdatesFromGlobal, floating


def _norm(arrays: dict[str, NDArray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v * v)) for v in arrays.values())))


def centered_clip(updates: list[dict[str, NDArray]], start: dict[str, NDArray], tau: float,
                  iterations: int) -> dict[str, NDArray]:
    """The centred-clipping aggregate of ``updates`` from ``start`` (float64 arrays)."""
    v = {name: value.astype(np.float64) for name, value in start.items()}
    for _ in range(iterations):
        step = {name: np.zeros_like(value) for name, value in v.items()}
        for update in updates:
            diff = {name: update[name] - v[name] for name in v}
            norm = _norm(diff)
            scale = 1.0 if norm <= tau else tau / norm
            for name in v:
                step[name] += scale * diff[name]
        v = {name: v[name] + step[name] / len(updates) for name in v}
    return v


class CenteredClipping(UpdatesFromGlobal):
    """Centred clipping [Karimireddy et al., 2021] with the server's momentum as its centre.

    Parameters
    ----------
    tau : float
        The clipping radius around the previous aggregate.
    iterations : int (default: 1)
        Clipping iterations per round (the paper finds one enough).
    **kwargs
        Passed to ``FedAvg`` (sampling, evaluation).
    """

    label = "centred clipping"

    def __init__(self, *, tau: float, iterations: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tau <= 0 or iterations < 1:
            raise ValueError(f"need tau > 0 and iterations >= 1, got {tau}, {iterations}")
        self.tau = tau
        self.iterations = iterations
        self.momentum: dict[str, NDArray] | None = None  # the last aggregate update

    def new_arrays(self, server_round: int, x: dict[str, NDArray], contents: list[RecordDict],
                   updates: list[dict[str, NDArray]]) -> dict[str, NDArray]:
        moving = floating(x)
        start = self.momentum or {name: np.zeros(v.shape) for name, v in moving.items()}
        self.momentum = centered_clip(updates, start, self.tau, self.iterations)
        return {name: x[name] + self.momentum[name] if name in moving else x[name] for name in x}
