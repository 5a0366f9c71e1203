"""Norm bounding with weak differential-privacy noise, against backdoors.

Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor Federated Learning?", 2019,
https://arxiv.org/abs/1911.07963. The server clips every update ``Δ_i = w_i - x`` to L2 norm
at most ``norm_bound`` (a boosted backdoor update loses its boost), averages them weighted by
examples as FedAvg, and adds Gaussian noise of standard deviation ``noise_std`` to each
coordinate of the mean ("weak DP": far too little noise for a useful privacy guarantee, enough
to wash out a backdoor's small directions). The noise is drawn from the seed and the round: it
is a defence, not a privacy mechanism (fedtune's DP is ``privacy.mode``).

Message protocol: as FedAvg (``"arrays"`` and a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from strategies.records import NDArray, UpdatesFromGlobal, metric


def bounded_mean(updates: list[dict[str, NDArray]], weights: list[float], bound: float
                 ) -> dict[str, NDArray]:
    """The weighted mean of ``updates``, each clipped to L2 norm ``bound`` first."""
    share = np.asarray(weights, np.float64) / float(np.sum(weights))
    total = {name: np.zeros(value.shape) for name, value in updates[0].items()}
    for s, update in zip(share, updates, strict=True):
        norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in update.values())))
        scale = 1.0 if norm <= bound else bound / norm
        for name in total:
            total[name] += s * scale * update[name]
    return total


class NormBoundDP(UpdatesFromGlobal):
    """Norm bounding + weak DP noise [Sun et al., 2019].

    Parameters
    ----------
    norm_bound : float
        The largest L2 norm of an update.
    noise_std : float
        Standard deviation of the Gaussian noise added to each coordinate of the mean (0: none).
    seed : int
        Seeds the noise of each round.
    **kwargs
        Passed to ``FedAvg`` (sampling, evaluation, ``weighted_by_key``).
    """

    label = "norm bound + DP"

    def __init__(self, *, norm_bound: float, noise_std: float, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if norm_bound <= 0 or noise_std < 0:
            raise ValueError(f"need norm_bound > 0 and noise_std >= 0, got {norm_bound}, "
                             f"{noise_std}")
        self.norm_bound = norm_bound
        self.noise_std = noise_std
        self.seed = seed

    def new_arrays(self, server_round: int, x: dict[str, NDArray], contents: list[RecordDict],
                   updates: list[dict[str, NDArray]]) -> dict[str, NDArray]:
        weights = [metric(c, self.weighted_by_key) for c in contents]
        mean = bounded_mean(updates, weights, self.norm_bound)
        rng = np.random.default_rng([self.seed, server_round])
        new = dict(x)
        for name, value in mean.items():
            new[name] = x[name] + value + rng.normal(0.0, self.noise_std, value.shape)
        return new
