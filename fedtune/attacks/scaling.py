"""Scaled updates: sign flipping (Damaskinos et al. 2018, "Asynchronous Byzantine machine
learning"; Li et al. 2019, "RSA") sends the negated update; scaling sends ``factor`` times it
(factor -10 is the boosted sign flip of Byzantine-robustness studies; a positive factor with a
backdoor is the model replacement of Bagdasaryan et al. 2020, ``attack.boost``)."""

from __future__ import annotations

import numpy as np

from fedtune.attacks.plan import UpdateContext


def scaled(context: UpdateContext, honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``attack.scale_factor`` times the honest update."""
    factor = float(context.settings["scale_factor"])
    return {name: factor * value for name, value in honest.items()}


def sign_flipped(context: UpdateContext, honest: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """The negated honest update."""
    return {name: -value for name, value in honest.items()}
