"""Min-max and min-sum (Shejwalkar & Houmansadr 2021, NDSS, "Manipulating the Byzantine"):
every colluder sends ``mean + gamma p`` with ``p = -std`` of the honest updates (the paper's
"inverse standard deviation" direction) and the largest ``gamma`` its binary search finds such
that the malicious update is no farther from the honest ones than they are from each other:

- min-max: its largest distance to an honest update <= the largest distance between two;
- min-sum: its sum of squared distances to the honest updates <= the largest such sum of one.

What the colluders see: the honest updates of their own collusion group (the paper's
"agnostic to the aggregation rule, partial knowledge" setting, each colluder training every
member's data). Search as the paper's Algorithm 1: gamma from 10, step halved to 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedtune.attacks.plan import UpdateContext, stacked, unflattened

GAMMA_INIT = 10.0
TOLERANCE = 1e-5


def _distances(points: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Squared distances of each row of ``points`` to each row of ``to`` (by their Gram matrix:
    no (rows x rows x coordinates) array for a large model)."""
    squared = (points ** 2).sum(axis=1)[:, None] + (to ** 2).sum(axis=1)[None, :]
    return np.maximum(squared - 2.0 * points @ to.T, 0.0)


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


def _crafted(context: UpdateContext, honest: dict[str, np.ndarray], rule: str
             ) -> dict[str, np.ndarray]:
    """The paper's update mean + gamma * direction for the largest gamma whose squared
    distances to the benign updates stay within the benign updates' own (their largest for
    min-max, the largest row sum for min-sum). A candidate's distances are a quadratic in gamma,
    ||m - b_j||^2 + 2 gamma (m - b_j).v + gamma^2 ||v||^2, so each step of the search costs one
    pass over the benign count, not over the model."""
    benign = stacked(context.benign)
    mean, direction = benign.mean(axis=0), -benign.std(axis=0)
    pairwise = _distances(benign, benign)
    offsets = mean[None] - benign
    constant, linear = (offsets ** 2).sum(axis=1), 2.0 * offsets @ direction
    quadratic = float(direction @ direction)

    def distances(gamma: float) -> np.ndarray:
        return np.maximum(constant + gamma * linear + gamma * gamma * quadratic, 0.0)

    if rule == "max":
        bound = pairwise.max()

        def fits(gamma: float) -> bool:
            return distances(gamma).max() <= bound
    else:
        bound = pairwise.sum(axis=1).max()

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
