"""The per-client accuracy distribution: what summary.json and metrics.csv report of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.protocol import PERSONAL_MODELS

GLOBAL, PERSONALISED, LOCAL_ONLY = PERSONAL_MODELS  # what personal.csv's ``model`` says
MODELS = PERSONAL_MODELS


def distribution(accuracies: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, median, 10th percentile (linear interpolation, numpy's default), worst client and
    standard deviation (population) of per-client accuracies; None where there are none."""
    values = np.asarray([a for a in accuracies if not np.isnan(a)], dtype=float)
    if not len(values):
        return {"clients": 0, "mean": None, "median": None, "p10": None, "worst": None,
                "std": None}
    return {"clients": len(values), "mean": float(values.mean()),
            "median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "worst": float(values.min()), "std": float(values.std())}


def share_worse(mine: Mapping[int, float], other: Mapping[int, float]) -> float | None:
    """The share of clients (those with both) whose ``mine`` accuracy is below ``other``."""
    both = [c for c in mine if c in other and mine[c] == mine[c] and other[c] == other[c]]
    if not both:
        return None
    return sum(mine[c] < other[c] for c in both) / len(both)


def own_model(by_model: Mapping[str, Mapping[int, float]]) -> str:
    """The model each client ends up with: its personalised one where the algorithm makes
    one, else the global one."""
    return PERSONALISED if by_model.get(PERSONALISED) else GLOBAL


def summarise(by_model: Mapping[str, Mapping[int, float]]) -> dict:
    """Every model's distribution, and the shares of clients whose own model does worse than
    training alone and than the global model."""
    own = by_model[own_model(by_model)]
    return {
        "own_model": own_model(by_model),
        "models": {name: distribution(list(by_model[name].values()))
                   for name in MODELS if by_model.get(name)},
        "worse_than_local_only": share_worse(own, by_model.get(LOCAL_ONLY, {})),
        "worse_than_global": (share_worse(own, by_model[GLOBAL])
                              if own is not by_model.get(GLOBAL) else None),
    }
