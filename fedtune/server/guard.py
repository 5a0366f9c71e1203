"""The model guard: bounds on each client's update, and no absurd or non-finite global model.

Screening (``fedtune.server.screening``) makes sure a reply is well formed and finite; it does
not stop a finite update that is far too large. Always on, on the updates ``Δ_k = w_k - w``
(L2 norm over the floating tensors that travel, in float64):

- an update longer than ``ABSURD`` (10⁶) times ``max(‖w‖, 1)`` is refused where it is
  screened (``absurd_update``), naming its sender: a finite update of 3e38 everywhere would
  otherwise make the mean finite but the next round's training overflow, so that every honest
  client, not the sender, would be rejected;
- the aggregate's step ``w' - w`` must not be longer than ``ABSURD`` times the largest of the
  accepted clients' update norms, ``‖w‖`` and 1 (``absurd_step``: a server learning rate of
  1e30 moves the model 10³⁰ times further than any client asked), and the new model must be
  finite (``non_finite_tensors``) and give a finite loss on the global test set
  (``fedtune.server.round``); otherwise the round keeps the previous model and is recorded as
  such.

Two optional rules bound the updates before the strategy sees them, one step over the round's
client reports (``bound_updates``), whichever transport brought them:

- ``strategy.update_norm_z`` rejects an update whose norm lies more than ``z`` robust standard
  deviations above the round's median norm: the modified z-score
  ``0.6745 (‖Δ_k‖ - median) / MAD`` of Iglewicz and Hoaglin (1993, "How to Detect and Handle
  Outliers"), whose median and median absolute deviation a minority of attackers cannot move.
- ``strategy.max_update_norm`` clips every update to at most that norm, ``Δ_k · min(1, C/‖Δ_k‖)``
  (the clipping of DP-FedAvg, McMahan et al. 2018, without the noise): whatever one client
  sends moves the mean by at most ``C`` times its weight. Such as the sign-flipped, boosted
  update of the scaling attack (``[attack] name = "scaling"``), which moves FedAvg's mean
  arbitrarily far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord

from fedtune.protocol import ARRAYS, npy_view
from fedtune.server.reports import ClientReport

MAD_SCALE = 0.6745  # the normal distribution's MAD in standard deviations (Iglewicz-Hoaglin)
# how many times longer than the model (or 1) an update, or than the clients' updates an
# aggregate step, may be before it is absurd: far beyond any learning rate that trains
ABSURD = 1e6
# chunk_passes.update_norms' relative margin below a bound where it measures exactly
NORM_ESTIMATE = 1e-5


def non_finite_tensors(arrays: ArrayRecord) -> list[str]:
    """Names of the floating tensors of ``arrays`` that hold a NaN or an infinity."""
    bad = []
    for name, array in arrays.items():
        values = npy_view(array)  # in place: the global model may be large
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad.append(name)
    return bad


def _squared(values: np.ndarray) -> float:
    """Σ values² of a float64 vector, by NumPy's own loop (``np.dot`` calls a threaded BLAS,
    whose threads cost more than the sum on a busy machine; ``einsum`` is one thread)."""
    return float(np.einsum("i,i->", values, values))


def model_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """‖w‖ over the floating tensors, in float64."""
    total = 0.0
    for value in arrays.values():
        if value.dtype.kind == "f":
            total += _squared(value.astype(np.float64, copy=False).ravel())
    return float(np.sqrt(total))


def update_norm(global_arrays: Mapping[str, np.ndarray],
                arrays: Mapping[str, np.ndarray]) -> float:
    """‖w_k - w‖ over the floating tensors, in float64."""
    total = 0.0
    for name, value in global_arrays.items():
        if value.dtype.kind == "f":
            total += _squared(np.subtract(arrays[name], value, dtype=np.float64).ravel())
    return float(np.sqrt(total))


def absurd_bound(global_norm: float) -> float:
    """The update norm above which ``absurd_update`` refuses an update."""
    return ABSURD * max(global_norm, 1.0)


def absurd_update(norm: float, global_norm: float) -> str | None:
    """Why an update of norm ``norm`` from a model of norm ``global_norm`` is absurd (None: it
    is not)."""
    if norm > absurd_bound(global_norm):
        return (f"update norm {norm:.4g} is absurd: more than {ABSURD:g} x max(the global "
                f"model's norm {global_norm:.4g}, 1)")
    return None


def absurd_step(step: float, client_norms: Sequence[float], global_norm: float) -> str | None:
    """Why an aggregate step of norm ``step`` is absurd next to the accepted clients' update
    norms and the model's norm (None: it is not)."""
    scale = max([*client_norms, global_norm, 1.0])
    if step > ABSURD * scale:
        largest = max(client_norms, default=0.0)
        return (f"the aggregate moves the model by {step:.4g}, more than {ABSURD:g} x max(the "
                f"largest client update {largest:.4g}, the model's norm {global_norm:.4g}, 1)")
    return None


def robust_z(norms: Sequence[float]) -> np.ndarray:
    """Modified z-scores ``0.6745 (x - median) / MAD`` (all 0 when the norms do not spread)."""
    values = np.asarray(norms, dtype=np.float64)
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad == 0:
        return np.zeros_like(values)
    return MAD_SCALE * (values - median) / mad


def clipped(global_arrays: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray],
            scale: float) -> dict[str, np.ndarray]:
    """``w + scale · (w_k - w)`` for the floating tensors, the others as sent, dtypes kept."""
    out = {}
    for name, value in global_arrays.items():
        if value.dtype.kind == "f":
            step = np.subtract(arrays[name], value, dtype=np.float64)
            out[name] = (value + scale * step).astype(value.dtype)
        else:
            out[name] = arrays[name]
    return out


def bound_updates(global_arrays: Mapping[str, np.ndarray], reports: Sequence[ClientReport],
                  max_norm: float, z_limit: float) -> None:
    """The round's one bounds step, on the accepted reports' updates (in place): updates above
    ``max_norm`` are clipped to it, outliers by ``z_limit`` become ``rejected`` with the reason.
    ``max_norm`` or ``z_limit`` 0: that rule is off."""
    accepted = [report for report in reports if report.status == "ok"]
    if not accepted or not (max_norm or z_limit):
        return
    updates = [updates_of(report) for report in accepted]
    norms = [update_norm(global_arrays, update[ARRAYS]) for update in updates]
    scores = robust_z(norms) if z_limit and len(accepted) >= 3 else np.zeros(len(accepted))
    for report, update, norm, score in zip(accepted, updates, norms, scores, strict=True):
        report.update_norm = norm
        if z_limit and score > z_limit:
            report.status = "rejected"
            report.reason = (f"update norm {norm:.4g} is an outlier: robust z-score "
                             f"{score:.3g} > strategy.update_norm_z = {z_limit:g}")
            report.update = report.reply = None
        elif max_norm and norm > max_norm:
            update[ARRAYS] = clipped(global_arrays, update[ARRAYS], max_norm / norm)
            report.update, report.reply = update, None  # the strategy gets the clipped update
            report.update_norm = max_norm


def updates_of(report: ClientReport) -> dict[str, dict[str, np.ndarray]]:
    """An accepted report's update as record name -> arrays (read from its reply when it came
    as a message)."""
    if report.update is not None:
        return report.update
    assert report.reply is not None, "an accepted report holds its update or its reply"
    content = report.reply.content
    return {name: {key: npy_view(array) for key, array in content[name].items()}
            for name in content.keys() if isinstance(content[name], ArrayRecord)}
