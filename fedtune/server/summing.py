"""The summing aggregator: what a strategy whose entry opts in (``weighted_mean`` in
``fedtune.tables.strategies``: FedAvg and the server optimizers on its mean) is handed.

Such a strategy depends on the replies only through FedAvg's example-weighted mean of their
models and metrics (McMahan et al. 2017), so its input is ``Σ n_k w_k`` and ``Σ n_k``, added in
float64 in client order: by fedtune's engines where the clients ran, block by block
(``fedtune.engine.cohort``), or here from the replies of any other runtime. The strategy then
gets one reply carrying the mean and the total ``num-examples`` (FedAvg's mean of one reply is
that reply, so Flower's strategies run unchanged), and the run's log says what happened - how
many clients, the sum - instead of Flower's "Received 1 results".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.server.reports import ClientReport

EXACT_WEIGHT = 2**29  # float32 (24-bit significand) x an integer up to this is exact in float64
NARROW_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class WeightedSum:
    """``Σ weight_k × update_k`` of the accepted clients' models, in float64, and ``Σ weight_k``
    (weights: ``num-examples``)."""

    total: dict[str, np.ndarray]
    weight: float = 0.0


def accumulate(total: dict[str, np.ndarray], arrays: Mapping[str, np.ndarray],
               weight: float) -> None:
    """``total += weight * arrays`` in float64.

    For float32 (or narrower) arrays and a whole weight up to 2**29, ``weight * value`` is
    exact in float64, so one fused multiply-add pass (torch's ``add_`` with ``alpha``) gives
    the same bits as multiplying, rounding and adding - with half the memory traffic; other
    arrays are multiplied and rounded first."""
    exact = weight.is_integer() and abs(weight) <= EXACT_WEIGHT
    fused_totals, fused_values = [], []
    for name, value in arrays.items():
        if exact and value.dtype in NARROW_FLOATS and value.flags.writeable:
            fused_totals.append(torch.from_numpy(total[name]))
            fused_values.append(torch.from_numpy(value))
        else:
            total[name] += np.multiply(value, weight, dtype=np.float64)
    if fused_totals:
        torch._foreach_add_(fused_totals, fused_values, alpha=weight)


def sum_updates(reports: Sequence[ClientReport],
                updates: Sequence[Mapping[str, np.ndarray]]) -> WeightedSum:
    """The weighted sum of accepted clients' models (``updates``: each report's ARRAYS), in
    client order."""
    first = updates[0]
    summed = WeightedSum({name: np.zeros(value.shape, np.float64)
                          for name, value in first.items()})
    for report, arrays in zip(reports, updates, strict=True):
        weight = float(report.metrics[protocol.NUM_EXAMPLES])
        accumulate(summed.total, arrays, weight)
        summed.weight += weight
    return summed


def weighted_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Flower's ``aggregate_metricrecords`` over these metrics (each key's values weighted by
    ``num-examples`` over the total), in float64 and client order. A key that only some carry
    (``train-loss``: a client that saw no example has none) is weighted over those that do; one
    whose carriers hold no example is left out."""
    weights = [float(m[protocol.NUM_EXAMPLES]) for m in metrics]
    totals: dict[str, float] = {}
    for values, weight in zip(metrics, weights, strict=True):
        for key in values:
            totals[key] = totals.get(key, 0) + weight
    out: dict[str, Any] = {}
    for values, weight in zip(metrics, weights, strict=True):
        for key, value in values.items():
            if key == protocol.NUM_EXAMPLES or not totals[key]:
                continue
            share = weight / totals[key]
            if isinstance(value, list):
                scaled = [float(v) * share for v in value]
                out[key] = ([a + b for a, b in zip(out[key], scaled, strict=True)]
                            if key in out else scaled)
            else:
                out[key] = out.get(key, 0.0) + float(value) * share
    return out


def mean_reply(summed: WeightedSum, accepted: Sequence[ClientReport], like: Message) -> Message:
    """One train reply carrying the example-weighted mean of the accepted updates (in the
    dtypes ``like`` sent), the weighted mean of their metrics and their total
    ``num-examples``: what a FedAvg-family strategy computes from all the replies."""
    arrays = like.content[protocol.ARRAYS]
    mean = {name: (summed.total[name] / summed.weight).astype(np.dtype(arrays[name].dtype))
            for name in summed.total}
    total_examples = sum(int(r.metrics[protocol.NUM_EXAMPLES]) for r in accepted)
    metrics = MetricRecord({**weighted_metrics([r.metrics for r in accepted]),
                            protocol.NUM_EXAMPLES: total_examples})
    content = RecordDict({protocol.ARRAYS: protocol.to_array_record(mean),
                          protocol.METRICS: metrics})
    return Message(content=content, reply_to=like)


class _FlowerReplyCount(logging.Filter):
    """Drops Flower's "aggregate_train: Received N results and M failures": the strategy is
    handed one reply that stands for many clients, and fedtune's own line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("%s: Received %s results")


@contextmanager
def _without_reply_count() -> Iterator[None]:
    flower_filter = _FlowerReplyCount()
    FLOWER_LOGGER.addFilter(flower_filter)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(flower_filter)


def aggregate_sum(strategy: Strategy, server_round: int, summed: WeightedSum,
                  accepted: Sequence[ClientReport], where: str, like: Message
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The strategy's aggregate of the accepted clients' sum, handed to it as their mean reply;
    the log names the clients and the sum (``where``: where it was added up)."""
    log(INFO, "aggregate_train: %s updates of clients %s summed %s (num-examples %s); "
        "the strategy aggregates their example-weighted mean", len(accepted),
        ", ".join(str(r.client_id) for r in accepted), where, f"{summed.weight:g}")
    reply = mean_reply(summed, accepted, like)
    with _without_reply_count():
        return strategy.aggregate_train(server_round, [reply])
