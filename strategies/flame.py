"""FLAME: clustering, adaptive clipping and adaptive noise against backdoors.

Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi, Schneider. "FLAME: Taming Backdoors in Federated Learning", USENIX
Security 2022, https://arxiv.org/abs/2101.02281 (Algorithm 1). Each round, from the updates
``Δ_i = w_i - x`` of the ``n`` replies:

1. **Filtering**: HDBSCAN over the pairwise cosine distances ``1 - cos(Δ_i, Δ_j)`` with a
   minimum cluster size of ``n // 2 + 1`` (and one sample per core point, one cluster allowed);
   the updates in the cluster are admitted, every other one is an outlier and left out. The
   paper clusters the local models; the models differ from one another only by their updates,
   so the distances between updates are the same comparison without the shared global model.
2. **Adaptive clipping**: ``S = median_i ||Δ_i||`` over all ``n`` updates; each admitted
   update is scaled to norm at most ``S``.
3. **Aggregation and adaptive noise**: the unweighted mean of the clipped admitted updates
   plus Gaussian noise of standard deviation ``lambda * S`` per coordinate (the paper's
   lambda = 0.001 for image and text classification). The noise is drawn from the seed and
   the round: a defence, not a privacy mechanism.

The clustering is scikit-learn's HDBSCAN (``sklearn.cluster.HDBSCAN``, Campello et al. 2013),
not a re-implementation. ``admitted`` keeps the last round's decision per reply (the filtering
metrics of an attacked run read it).

Message protocol: as FedAvg (``"arrays"`` and a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict
from sklearn.cluster import HDBSCAN

from strategies.records import NDArray, UpdatesFromGlobal, add_flat_step, flatten


def cosine_distances(flat: NDArray) -> NDArray:
    """Pairwise ``1 - cos`` of the rows of ``flat`` (a zero row is at distance 1 from all)."""
    norms = np.linalg.norm(flat, axis=1)
    unit = flat / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def admitted_updates(flat: NDArray) -> NDArray:
    """FLAME's filter: True for the updates in the HDBSCAN cluster of at least n // 2 + 1."""
    n = len(flat)
    if n < 3:  # HDBSCAN needs two points per cluster; with fewer, nothing can be outvoted
        return np.ones(n, bool)
    distances = cosine_distances(flat)
    np.fill_diagonal(distances, 0.0)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distances).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:  # no cluster formed: FLAME's majority assumption fails; keep all
        return np.ones(n, bool)
    return labels == np.bincount(clustered).argmax()


def flame_step(flat: NDArray, noise_lambda: float, rng: np.random.Generator
               ) -> tuple[NDArray, NDArray]:
    """The aggregate step of one round from the flat updates, and which were admitted."""
    admitted = admitted_updates(flat)
    norms = np.linalg.norm(flat, axis=1)
    bound = float(np.median(norms))
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    step = (flat[admitted] * scale[admitted, None]).mean(axis=0)
    return step + rng.normal(0.0, noise_lambda * bound, step.shape), admitted


class Flame(UpdatesFromGlobal):
    """FLAME [Nguyen et al., 2022].

    Parameters
    ----------
    noise_lambda : float
        The noise level: standard deviation ``noise_lambda * S`` per coordinate, ``S`` the
        round's median update norm (0: no noise).
    seed : int
        Seeds the noise of each round.
    **kwargs
        Passed to ``FedAvg`` (sampling, evaluation).
    """

    label = "FLAME"

    def __init__(self, *, noise_lambda: float, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if noise_lambda < 0:
            raise ValueError(f"need noise_lambda >= 0, got {noise_lambda}")
        self.noise_lambda = noise_lambda
        self.seed = seed
        self.admitted = np.zeros(0, bool)  # the last round's decisions, in reply order

    def new_arrays(self, server_round: int, x: dict[str, NDArray], contents: list[RecordDict],
                   updates: list[dict[str, NDArray]]) -> dict[str, NDArray]:
        names = list(updates[0])
        flat = np.stack([flatten(u, names) for u in updates])
        rng = np.random.default_rng([self.seed, server_round])
        step, self.admitted = flame_step(flat, self.noise_lambda, rng)
        return add_flat_step(x, names, step)
