"""FedAvg with aggregation pushed down: its weighted mean computed as partial sums where the
clients train (``engine.aggregate_on_actors``).

FedAvg's new global model is sum_k n_k w_k / sum_k n_k over the clients that answered
(McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data"). A sum splits over any grouping of the clients, so each Ray actor folds the updates of
the clients it served into one running sum (``WeightedSum``) and sends that sum instead of one
update per client; the server adds the partial sums and divides (``folded_mean``). Only a
strategy whose aggregate is exactly this mean may use it (``weighted_mean`` in
``fedtune.tables.strategies``); ``FoldedFedAvg`` is that strategy, so the round loop aggregates
the same way whatever the engine does.

A folded training reply keeps its metrics and loses its arrays; the last reply released from a
partial sum carries that sum (``protocol.FOLD_SUM``) and its weight and count
(``protocol.FOLD_META``). A reply is screened (``fedtune.server.screening``) before it is
folded; one that fails is returned whole, for the server to reject.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedtune.protocol import FOLD_META, FOLD_SUM, FOLDED


class WeightedSum:
    """Running sum of weight * arrays in float64, and the total weight and count behind it."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        for name, array in arrays.items():
            value = array.numpy()
            if name not in self.sums:
                self.sums[name] = np.zeros(value.shape, dtype=np.float64)
                self.dtypes[name] = value.dtype
            self.sums[name] += weight * value
        self.weight += weight
        self.count += 1

    def merge(self, other: WeightedSum) -> None:
        for name, value in other.sums.items():
            if name not in self.sums:
                self.sums[name] = np.zeros_like(value)
                self.dtypes[name] = other.dtypes[name]
            self.sums[name] += value
        self.weight += other.weight
        self.count += other.count

    def records(self) -> tuple[ArrayRecord, ConfigRecord]:
        """The sum as records a reply can carry (float64, so no precision is lost in transit)."""
        arrays = ArrayRecord({name: Array(value) for name, value in self.sums.items()})
        meta = ConfigRecord({"weight": self.weight, "count": self.count,
                             "dtypes": [str(self.dtypes[name]) for name in self.sums]})
        return arrays, meta

    @classmethod
    def from_records(cls, arrays: ArrayRecord, meta: ConfigRecord) -> WeightedSum:
        partial = cls()
        for (name, array), dtype in zip(arrays.items(), meta["dtypes"], strict=True):
            partial.sums[name] = array.numpy()
            partial.dtypes[name] = np.dtype(dtype)
        partial.weight = float(meta["weight"])
        partial.count = int(meta["count"])
        return partial

    def mean(self) -> ArrayRecord:
        return ArrayRecord({name: Array((value / self.weight).astype(self.dtypes[name]))
                            for name, value in self.sums.items()})


def strip_arrays(reply: Message) -> ArrayRecord:
    """Take the arrays out of a training reply (they were folded); return them."""
    names = list(reply.content.array_records)
    if len(names) != 1:
        raise ValueError(f"a folded reply must carry one ArrayRecord, this one has {len(names)}")
    arrays = reply.content.array_records[names[0]]
    del reply.content[names[0]]
    reply.content[FOLDED] = ConfigRecord()
    return arrays


def attach_sum(reply: Message, partial: WeightedSum) -> None:
    arrays, meta = partial.records()
    reply.content[FOLD_SUM] = arrays
    reply.content[FOLD_META] = meta


def folded_mean(replies: Iterable[Message]) -> ArrayRecord:
    """The weighted mean from the partial sums the replies carry; every reply must be in one."""
    replies = list(replies)
    total = WeightedSum()
    for reply in replies:
        if FOLD_SUM in reply.content:
            total.merge(WeightedSum.from_records(reply.content.array_records[FOLD_SUM],
                                                 reply.content.config_records[FOLD_META]))
    if total.count != len(replies) or total.weight <= 0:
        raise ValueError(f"partial sums cover {total.count} clients, but {len(replies)} replied")
    return total.mean()


class FoldedFedAvg(FedAvg):
    """FedAvg whose replies arrive folded into partial sums: sampling and evaluation as FedAvg,
    the aggregate from the sums (``folded_mean``), the same weighted mean up to float
    rounding."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return folded_mean(replies), metrics
