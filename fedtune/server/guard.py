"""The model guard: bounds on each client's update, and no non-finite global model, ever.

Screening (``fedtune.server.screening``) makes sure a reply is well formed and finite; it does
not stop a finite update that is far too large, such as the sign-flipped, boosted update of the
scaling attack (``[attack] name = "scaling"``), which moves FedAvg's mean arbitrarily far.
Two optional rules bound the updates ``Δ_k = w_k - w`` (L2 norm over the floating tensors that
travel) before the strategy sees them:

- ``strategy.update_norm_z`` rejects an update whose norm lies more than ``z`` robust standard
  deviations above the round's median norm: the modified z-score
  ``0.6745 (‖Δ_k‖ - median) / MAD`` of Iglewicz and Hoaglin (1993, "How to Detect and Handle
  Outliers"), whose median and median absolute deviation a minority of attackers cannot move.
- ``strategy.max_update_norm`` clips every update to at most that norm, ``Δ_k · min(1, C/‖Δ_k‖)``
  (the clipping of DP-FedAvg, McMahan et al. 2018, without the noise): whatever one client
  sends moves the mean by at most ``C`` times its weight.

And whatever the strategy returns, a global model with a NaN or an infinity is never kept
(``non_finite_tensors``): the round keeps the previous model and is recorded as failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedtune.protocol import ARRAYS, npy_view

MAD_SCALE = 0.6745  # the normal distribution's MAD in standard deviations (Iglewicz-Hoaglin)


def non_finite_tensors(arrays: ArrayRecord) -> list[str]:
    """Names of the floating tensors of ``arrays`` that hold a NaN or an infinity."""
    bad = []
    for name, array in arrays.items():
        values = npy_view(array)  # in place: the global model may be large
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad.append(name)
    return bad


def update_norm(global_arrays: Mapping[str, np.ndarray], arrays: ArrayRecord) -> float:
    """‖w_k - w‖ over the floating tensors, in float64."""
    total = 0.0
    for name, value in global_arrays.items():
        if value.dtype.kind == "f":
            step = arrays[name].numpy().astype(np.float64) - value
            total += float(np.dot(step.ravel(), step.ravel()))
    return float(np.sqrt(total))


def robust_z(norms: Sequence[float]) -> np.ndarray:
    """Modified z-scores ``0.6745 (x - median) / MAD`` (all 0 when the norms do not spread)."""
    values = np.asarray(norms, dtype=np.float64)
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad == 0:
        return np.zeros_like(values)
    return MAD_SCALE * (values - median) / mad


def clipped(global_arrays: Mapping[str, np.ndarray], arrays: ArrayRecord,
            scale: float) -> ArrayRecord:
    """``w + scale · (w_k - w)`` for the floating tensors, the others as sent, dtypes kept."""
    out = ArrayRecord()
    for name, value in global_arrays.items():
        if value.dtype.kind == "f":
            step = arrays[name].numpy().astype(np.float64) - value
            out[name] = Array((value + scale * step).astype(value.dtype))
        else:
            out[name] = arrays[name]
    return out


def bound_updates(global_arrays: Mapping[str, np.ndarray], replies: Sequence[Message],
                  max_norm: float, z_limit: float
                  ) -> tuple[list[Message], list[tuple[Message, str]]]:
    """(replies kept, with updates above ``max_norm`` clipped to it; replies rejected as
    outliers with their reason). ``max_norm`` or ``z_limit`` 0: that rule is off."""
    if not replies or not (max_norm or z_limit):
        return list(replies), []
    norms = [update_norm(global_arrays, reply.content[ARRAYS]) for reply in replies]
    scores = robust_z(norms) if z_limit and len(replies) >= 3 else np.zeros(len(replies))
    kept, rejected = [], []
    for reply, norm, score in zip(replies, norms, scores, strict=True):
        if z_limit and score > z_limit:
            rejected.append((reply, f"update norm {norm:.4g} is an outlier: robust z-score "
                                    f"{score:.3g} > strategy.update_norm_z = {z_limit:g}"))
            continue
        if max_norm and norm > max_norm:
            reply.content[ARRAYS] = clipped(global_arrays, reply.content[ARRAYS],
                                            max_norm / norm)
        kept.append(reply)
    return kept, rejected
