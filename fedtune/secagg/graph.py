"""The SecAgg+ neighbour graph: who masks with and holds shares of whom.

SecAgg (Bonawitz et al. 2017) joins every pair of clients, so each client's work and messages
grow with the cohort ``n``. SecAgg+ (Bell et al. 2020, Section 3) joins each client to its ``k``
neighbours in a random ``k``-regular graph - the Harary graph ``H(k, n)``, every node joined to
the ``k/2`` nearest on each side of a ring, over a random permutation of the nodes - so a
client's cost grows with ``k`` (``O(log n)`` suffices for their guarantees), not with ``n``.

The permutation comes from a public seed the server announces, so each client recomputes its
own neighbours and refuses a server that names others. A secret is reconstructed from
``t = ceil(threshold * k)`` of the ``k`` shares its owner handed out; ``threshold > 1/2`` keeps a
server that lies about who dropped from collecting both secrets of one client (a neighbour
reveals one of them only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

_EPSILON = 1e-9  # 2/3 * 9 is 5.999...: no rounding up past a whole number


def effective_degree(degree: int, cohort: int) -> int:
    """Neighbours per client in a cohort of ``cohort`` clients (``degree`` 0 = all others)."""
    if degree == 0 or degree >= cohort - 1:
        return cohort - 1
    return degree


def share_threshold(degree: int, fraction: float) -> int:
    """``t``: how many of a client's ``degree`` shares reconstruct its secrets (at least 2: one
    share alone would be the secret)."""
    return max(2, math.ceil(fraction * degree - _EPSILON))


def min_survivors(cohort: int, degree: int, fraction: float) -> int:
    """The fewest masked inputs a round accepts: ``fraction`` of the cohort, and one more than
    ``t`` (every survivor needs ``t`` surviving neighbours)."""
    return max(math.ceil(fraction * cohort - _EPSILON), share_threshold(degree, fraction) + 1)


def neighbours(nodes: Iterable[int], degree: int, seed: int) -> dict[int, frozenset[int]]:
    """Every node's neighbours: ``H(degree, n)`` over a permutation drawn from ``seed`` (the
    complete graph when ``degree`` reaches ``n - 1``)."""
    order = sorted(set(nodes))
    n = len(order)
    k = effective_degree(degree, n)
    if k == n - 1:
        return {u: frozenset(order) - {u} for u in order}
    if k % 2:
        raise ValueError(f"a {k}-regular ring graph on {n} nodes needs an even degree")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    ring = [order[i] for i in rng.permutation(n)]
    half = k // 2
    return {u: frozenset(ring[(i + offset) % n] for offset in range(-half, half + 1) if offset)
            for i, u in enumerate(ring)}
