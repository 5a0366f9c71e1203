"""Bucketing: any robust aggregator, applied to the means of random buckets of updates.

Karimireddy, He, Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
ICLR 2022, https://arxiv.org/abs/2006.09365 (Algorithm 1). Each round the replies are shuffled
(seeded by the run's seed and the round), cut into buckets of ``bucket_size`` and averaged per
bucket (weighted by examples, as FedAvg); the inner robust aggregator then sees the bucket means
instead of the updates. Averaging shrinks the spread that non-IID data gives honest updates, so
an aggregator tuned for IID data (median, Krum) stops mistaking honest heterogeneity for attack,
while ``f`` attackers still spoil at most ``f`` buckets.

Message protocol: as the inner strategy's (``"arrays"`` and ``"num-examples"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.records import metric, to_numpy, to_record


def bucket_order(count: int, seed: int, server_round: int) -> list[int]:
    """The shuffled order of ``count`` replies in ``server_round``."""
    return [int(i) for i in np.random.default_rng([seed, server_round]).permutation(count)]


class Bucketing(FedAvg):
    """Bucketing [Karimireddy et al., 2022] around the ``inner`` strategy's aggregation.

    Parameters
    ----------
    inner : Strategy
        The robust aggregator that sees the bucket means (its ``aggregate_train`` only, so a
        stateless one: median, trimmed mean, Krum, Multi-Krum, RFA).
    bucket_size : int (default: 2)
        Updates per bucket (the paper's s; the last bucket may hold fewer).
    seed : int
        Seeds the shuffle of each round.
    **kwargs
        Passed to ``FedAvg`` (sampling, evaluation).
    """

    def __init__(self, *, inner: Strategy, bucket_size: int = 2, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if bucket_size < 1:
            raise ValueError(f"need bucket_size >= 1, got {bucket_size}")
        self.inner = inner
        self.bucket_size = bucket_size
        self.seed = seed

    def buckets(self, server_round: int, replies: list[Message]) -> list[list[Message]]:
        """The round's buckets of replies."""
        order = bucket_order(len(replies), self.seed, server_round)
        shuffled = [replies[i] for i in order]
        return [shuffled[i:i + self.bucket_size]
                for i in range(0, len(shuffled), self.bucket_size)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        means = [self._mean_reply(bucket) for bucket in self.buckets(server_round, valid)]
        arrays, _ = self.inner.aggregate_train(server_round, means)
        contents = [message.content for message in valid]
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _mean_reply(self, bucket: list[Message]) -> Message:
        weights = np.array([metric(m.content, self.weighted_by_key) for m in bucket])
        models = [to_numpy(m.content[self.arrayrecord_key]) for m in bucket]
        share = weights / weights.sum() if weights.sum() > 0 else np.full(len(bucket),
                                                                          1 / len(bucket))
        mean = {name: sum(s * models[i][name].astype(np.float64) for i, s in enumerate(share))
                for name in models[0]}
        content = RecordDict({
            self.arrayrecord_key: to_record(mean, models[0]),
            "metrics": MetricRecord({self.weighted_by_key: int(weights.sum())})})
        return Message(content=content, reply_to=bucket[0])

