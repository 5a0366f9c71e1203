"""A little is enough (Baruch, Baruch & Goldberg 2019, NeurIPS): every colluder sends
``mean - z * std`` of the honest updates coordinate-wise, small enough per coordinate to pass
median- and distance-based defences, consistent enough to steer them.

What the colluders see: the honest updates of their own collusion group (each colluder trains
every member's data from the round's global model), the paper's weaker assumption of attackers
that estimate the benign statistics from their own data. ``z`` defaults to the paper's
``z_max``: with ``n`` clients per round and ``m`` attackers among them,
``s = floor(n / 2 + 1) - m`` honest clients must be won over and ``z_max = Phi^-1((n - s) / n)``.
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.attacks.plan import UpdateContext, normal_quantile, stacked, unflattened

Z_WHEN_UNBOUNDED = 3.0  # attackers that are a majority: the paper's bound has no finite z


def z_max(clients_per_round: int, attackers: float) -> float:
    """The paper's z_max (Baruch et al. 2019, Algorithm 3)."""
    n, m = clients_per_round, max(1, round(attackers))
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n
    return Z_WHEN_UNBOUNDED if p >= 1 else max(0.0, normal_quantile(p))


def alie_update(context: UpdateContext, honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mean - z std of the group's honest updates."""
    benign = stacked(context.benign)
    z = float(context.settings["alie_z"]) or z_max(context.clients_per_round,
                                                   context.attackers_per_round)
    return unflattened(benign.mean(axis=0) - z * benign.std(axis=0), honest)
