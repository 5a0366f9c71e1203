"""Min-max and min-sum (Shejwalkar & Houmansadr 2021, NDSS, "Manipulating the Byzantine"):
every colluder sends ``mean + gamma p`` with ``p = -std`` of the honest updates (the paper's
"inverse standard deviation" direction) and the largest ``gamma`` its binary search finds such
that the malicious update is no farther from the honest ones than they are from each other:

- min-max: its largest distance to an honest update <= the largest distance between two;
- min-sum: its sum of squared distances to the honest updates <= the largest such sum of one.

What the colluders see: the honest updates of their own collusion group (the paper's
"agnostic to the aggregation rule, partial knowledge" setting, each colluder training every
member's data). Search as the paper's Algorithm 1: gamma from 10, step halved to 1e-5.

What it costs. Everything is measured on the updates' offsets ``o_i = b_i - mean`` (one
float64 matrix, n x d): a candidate's squared distances are a quadratic in gamma, so each step
of the search is one pass over the n benign updates; min-sum's bound needs no pairs at all
(sum_j ||b_i - b_j||^2 = n ||o_i||^2 + sum_j ||o_j||^2, as the offsets sum to zero); min-max's
largest pairwise distance takes the n x n Gram matrix of the offsets, formed in float32 (half
a float64 one's time) only to find the pairs near the largest, whose distances are then formed
again in float64 - the bound is the float64 one. A group's update is formed once a round
(``fedtune.client.attacking``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedtune.attacks.plan import UpdateContext, stacked, unflattened

GAMMA_INIT = 10.0
TOLERANCE = 1e-5
# how far a float32 Gram entry may stray, in units of 2^-24 |o_i| |o_j|: rounding errors of a
# sum of d products grow as sqrt(d) (8 x that for margin) plus the float32 copy of each term
_FLOAT32_SPREAD = 8.0
_FLOAT32_UNIT = 2.0 ** -24


def largest_gamma(fits: Callable[[float], bool]) -> float:
    """The paper's search: the largest gamma (to TOLERANCE) for which ``fits`` holds, 0 if
    none does."""
    gamma, step, found = GAMMA_INIT, GAMMA_INIT / 2, 0.0
    while abs(found - gamma) > TOLERANCE:
        if fits(gamma):
            found = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return found


def largest_pairwise(offsets: np.ndarray, norms: np.ndarray) -> float:
    """max over i, j of ||o_i - o_j||^2 = |o_i|^2 + |o_j|^2 - 2 o_i.o_j (``norms``: the
    |o_i|^2), in float64: the float32 Gram matrix picks the rows of every pair within its
    rounding of the largest, and their Gram matrix in float64 gives the value."""
    low = offsets.astype(np.float32)
    approx = norms[:, None] + norms[None, :] - 2.0 * (low @ low.T)
    slack = (_FLOAT32_SPREAD * np.sqrt(offsets.shape[1]) + 2.0) * _FLOAT32_UNIT * norms.max()
    near = np.flatnonzero((approx >= approx.max() - 4.0 * slack).any(axis=1))
    rows, row_norms = offsets[near], norms[near]
    exact = row_norms[:, None] + row_norms[None, :] - 2.0 * (rows @ rows.T)
    return max(float(exact.max()), 0.0)


def _crafted(context: UpdateContext, honest: dict[str, np.ndarray], rule: str
             ) -> dict[str, np.ndarray]:
    """The paper's update mean + gamma * direction for the largest gamma whose squared
    distances to the benign updates stay within the benign updates' own (their largest for
    min-max, the largest row sum for min-sum): a candidate's distances are the quadratic
    ||o_j||^2 - 2 gamma o_j.v + gamma^2 ||v||^2 in gamma (``o_j = b_j - mean``)."""
    offsets = stacked(context.benign)
    count = len(offsets)
    mean = offsets.mean(axis=0)
    offsets -= mean
    direction = -np.sqrt(np.einsum("ij,ij->j", offsets, offsets) / count)  # -std
    constant = np.einsum("ij,ij->i", offsets, offsets)
    linear = -2.0 * (offsets @ direction)
    quadratic = float(direction @ direction)

    def distances(gamma: float) -> np.ndarray:
        return np.maximum(constant + gamma * linear + gamma * gamma * quadratic, 0.0)

    if rule == "max":
        bound = largest_pairwise(offsets, constant)

        def fits(gamma: float) -> bool:
            return distances(gamma).max() <= bound
    else:
        bound = count * float(constant.max()) + float(constant.sum())

        def fits(gamma: float) -> bool:
            return distances(gamma).sum() <= bound
    return unflattened(mean + largest_gamma(fits) * direction, honest)


def min_max_update(context: UpdateContext, honest: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """Min-max's malicious update."""
    return _crafted(context, honest, "max")


def min_sum_update(context: UpdateContext, honest: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """Min-sum's malicious update."""
    return _crafted(context, honest, "sum")
