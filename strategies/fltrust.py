"""FLTrust: the server's own update on a small root dataset decides whom to trust.

Cao, Fang, Liu, Gong. "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021, https://arxiv.org/abs/2012.13995 (Algorithm 1). Each round the server trains the
global model ``x`` on its root dataset the way clients train, giving ``g0``; each client update
``Δ_i = w_i - x`` gets the trust score ``TS_i = ReLU(cos(Δ_i, g0))`` and is rescaled to
``g0``'s norm; the new model is

    x + sum_i TS_i (||g0|| / ||Δ_i||) Δ_i / sum_i TS_i

(``x`` unchanged when every score is 0). An update pointing away from the server's direction
gets no weight, and no update weighs more than ``g0``'s norm, so scaling buys nothing.
``root_update`` computes ``g0`` (the caller owns the root data and the training); the scores of
the last round are kept in ``trust`` (a client with score 0 was filtered out).

Message protocol: as FedAvg (``"arrays"`` and a MetricRecord with ``"num-examples"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import RecordDict

from strategies.records import (
    NDArray,
    UpdatesFromGlobal,
    add_flat_step,
    flatten,
    floating,
)

RootUpdate = Callable[[dict[str, NDArray], int], dict[str, NDArray]]  # (x, round) -> g0


def trust_scores(updates: list[NDArray], server: NDArray) -> NDArray:
    """ReLU of the cosine similarity of each update with the server's."""
    norm = np.linalg.norm(server)
    scores = [max(0.0, float(u @ server) / (np.linalg.norm(u) * norm))
              if np.linalg.norm(u) > 0 and norm > 0 else 0.0 for u in updates]
    return np.array(scores)


def fltrust_update(updates: list[NDArray], server: NDArray) -> tuple[NDArray, NDArray]:
    """(the aggregate update, the trust scores) of flattened ``updates``."""
    scores = trust_scores(updates, server)
    if scores.sum() == 0:
        return np.zeros_like(server), scores
    norm = np.linalg.norm(server)
    total = sum(s * (norm / np.linalg.norm(u)) * u for s, u in zip(scores, updates, strict=True)
                if s > 0)
    return total / scores.sum(), scores


class FLTrust(UpdatesFromGlobal):
    """FLTrust [Cao et al., 2021].

    Parameters
    ----------
    root_update : Callable[[dict[str, NDArray], int], dict[str, NDArray]]
        The server's update ``g0`` on its root data from the global model ``x`` in a round
        (the floating arrays, as ``trained - x``).
    **kwargs
        Passed to ``FedAvg`` (sampling, evaluation).
    """

    label = "FLTrust"

    def __init__(self, *, root_update: RootUpdate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root_update = root_update
        self.trust = np.zeros(0)  # the last round's scores, in reply order

    def new_arrays(self, server_round: int, x: dict[str, NDArray], contents: list[RecordDict],
                   update_arrays: list[dict[str, NDArray]]) -> dict[str, NDArray]:
        names = list(floating(x))
        server = flatten(self.root_update(x, server_round), names)
        updates = [flatten(update, names) for update in update_arrays]
        step, self.trust = fltrust_update(updates, server)
        return add_flat_step(x, names, step)
