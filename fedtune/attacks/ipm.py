"""Inner-product manipulation (Xie, Koyejo & Gupta 2020, UAI, "Fall of empires"): every
colluder sends ``-epsilon`` times the mean of the honest updates, so that the aggregate's inner
product with the true gradient turns negative. What the colluders see: the honest updates of
their own collusion group (each colluder trains every member's data)."""

from __future__ import annotations

import numpy as np

from fedtune.attacks.plan import UpdateContext, stacked, unflattened


def ipm_update(context: UpdateContext, honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """-epsilon x the group's mean honest update."""
    epsilon = float(context.settings["ipm_epsilon"])
    return unflattened(-epsilon * stacked(context.benign).mean(axis=0), honest)
