"""Misbehaving clients for robustness experiments (the ``[faults]`` config section).

A ``FaultPlan`` says which clients misbehave and how. It is derived from the config alone
(which clients: drawn once from ``run.seed``), so the server and every client process agree,
and the same clients misbehave in every round. Faults act on a client's finished reply, after
honest local training, in the order of ``corrupt_update``.

Kinds so far:

- scaled update (``scale_fraction``, ``scale_factor``): the client sends
  ``x + factor * (y - x)`` instead of its model ``y`` (``x``: the global model it received),
  e.g. factor -10, the sign-flipping, boosting attack of Byzantine-robustness studies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import Config

_SCALE_STREAM = 0xFA17  # seed stream of the scaled-update draw, apart from the data stages


def draw_clients(num_clients: int, fraction: float, seed: int, stream: int) -> frozenset[int]:
    """``fraction`` of the clients (rounded half up), drawn from ``seed`` and a stream id."""
    count = int(fraction * num_clients + 0.5)
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class FaultPlan:
    """Which clients misbehave, and how."""

    scaled_clients: frozenset[int] = frozenset()
    scale_factor: float = 1.0

    @classmethod
    def from_config(cls, config: Config) -> FaultPlan:
        f = config.faults
        return cls(draw_clients(config.data.num_clients, f.scale_fraction, config.run.seed,
                                _SCALE_STREAM), f.scale_factor)

    def corrupt_update(self, client_id: int, global_arrays: dict[str, np.ndarray],
                       local_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What ``client_id`` sends instead of its honest model ``local_arrays``."""
        if client_id not in self.scaled_clients:
            return local_arrays
        return {name: (global_arrays[name] + self.scale_factor
                       * (value - global_arrays[name])).astype(value.dtype)
                for name, value in local_arrays.items()}

    def describe(self) -> dict[str, object]:
        """For summary.json: who misbehaved and how."""
        return {"scaled_clients": sorted(self.scaled_clients), "scale_factor": self.scale_factor}
