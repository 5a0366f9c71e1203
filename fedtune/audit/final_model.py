"""The exact ε of DP-FedAvg's final model with respect to one canary client: the number the
central audit's estimate should read for a mechanism that is exactly as accounted.

The canary clients' updates go into a shadow release that is *linear* in them (a canary sends
``C_t u`` whatever the model), its noise is Gaussian and isotropic, and the server optimizer is
SGD with momentum β and rate η. The final release's projection on a canary's direction is then
``Σ_t v_t B_t + N(0, σ_Δ² Σ_t v_t²)`` (in units of 1 / qN), with ``v_t = w_t C_t``,
``w_t = η (1 - β^(T-t+1)) / (1 - β)`` the weight the final model gives round t's mean update,
``C_t`` the round's clip bound and ``B_t ~ Bernoulli(q)`` whether the canary was sampled;
everything orthogonal to the direction is independent of the canary. So the final model's ε for
that canary is the ε of a mixture of Gaussians against a Gaussian: the "last iterate" analysis
of Steinke et al. 2024 ("The Last Iterate Advantage: Empirical Auditing and Principled
Heuristic Analysis of Differentially Private SGD"), a heuristic for non-linear training and
exact for this linear release. dp-accounting computes it (``from_mixture_gaussian_mechanism``,
both adjacency directions). It is at most the ε of releasing every round (the accountant's
update channel): the final model is a post-processing of them.
"""

from __future__ import annotations

import math

import numpy as np


def momentum_weights(rounds: int, learning_rate: float, momentum: float) -> np.ndarray:
    """``w_t``: how much of round t's mean update the model after ``rounds`` rounds of server
    SGD (``m ← βm + Δ̄; w ← w + ηm``) holds."""
    left = rounds - np.arange(1, rounds + 1) + 1  # rounds from t to T
    if momentum == 0:
        return np.full(rounds, float(learning_rate))
    return learning_rate * (1 - momentum ** left) / (1 - momentum)


def participation_distribution(weights: np.ndarray, sample_rate: float, cells: int = 4
                               ) -> tuple[np.ndarray, np.ndarray]:
    """(support, probabilities) of ``Σ_t w_t B_t`` with ``B_t ~ Bernoulli(sample_rate)``, on
    a grid of ``max(w) / cells``: each ``w_t`` is split between its two neighbouring grid points
    in proportion, so the mean is exact (4 cells give ε to four digits at the study's
    settings; 1 and 10 cells agree). Written by hand: a convolution of T two-point laws."""
    weights = np.asarray(weights, dtype=float)
    if weights.size == 0 or weights.min() < 0 or weights.max() == 0:
        raise ValueError("weights must be non-negative, at least one positive")
    step = float(weights.max()) / cells
    pmf = np.zeros(math.ceil(weights.sum() / step) + 2)
    pmf[0] = 1.0
    for cell in weights / step:
        low, frac = int(cell), cell - int(cell)
        moved = np.zeros_like(pmf)
        moved[low:] += (1 - frac) * pmf[:len(pmf) - low]
        moved[low + 1:] += frac * pmf[:len(pmf) - low - 1]
        pmf = (1 - sample_rate) * pmf + sample_rate * moved
    kept = np.flatnonzero(pmf > 1e-30)
    return kept * step, pmf[kept] / pmf[kept].sum()


def final_model_epsilon(update_noise: float, sample_rate: float, weights: np.ndarray,
                        delta: float) -> float:
    """ε at ``delta`` of the final release with respect to one canary whose round-t update
    enters it with weight ``weights[t]`` (``w_t C_t``), under update noise multiplier
    ``update_noise`` (σ_Δ) and Poisson rate ``sample_rate``."""
    from dp_accounting.pld import privacy_loss_distribution

    if update_noise <= 0:
        return math.inf
    weights = np.asarray(weights, dtype=float)
    support, probabilities = participation_distribution(weights, sample_rate)
    pld = privacy_loss_distribution.from_mixture_gaussian_mechanism(
        update_noise * float(np.sqrt(np.sum(weights ** 2))), support.tolist(),
        probabilities.tolist(), value_discretization_interval=1e-3)
    return float(pld.get_epsilon_for_delta(delta))
