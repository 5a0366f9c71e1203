"""The Gaussian attack (Blanchard et al. 2017, "Machine learning with adversaries"; Fang et al.
2020): an attacker sends random noise instead of its update, N(0, std^2) per coordinate, drawn
from (run.seed, round, client)."""

from __future__ import annotations

import numpy as np

from fedtune.attacks.plan import UpdateContext


def gaussian_update(context: UpdateContext, honest: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Noise shaped as the honest update, its own ignored."""
    std = float(context.settings["noise_std"])
    return {name: context.rng.normal(0.0, std, value.shape) for name, value in honest.items()}
