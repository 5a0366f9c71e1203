"""Aggregation push-down: partial sums, however the clients are grouped, give FedAvg's mean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtune.engine.inprocess import act_as_server
from fedtune.protocol import NUM_EXAMPLES as WEIGHT_KEY
from fedtune.server.folded import WeightedSum, attach_sum, folded_mean, strip_arrays


def _reply(rng: np.random.Generator, client: int) -> Message:
    act_as_server(1)
    arrays = ArrayRecord({"w": Array(rng.normal(size=(5, 3)).astype(np.float32)),
                          "b": Array(rng.normal(size=3).astype(np.float32))})
    metrics = MetricRecord({WEIGHT_KEY: int(rng.integers(1, 50)), "partition-id": client})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), 1000 + client, "train")


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3, 4, 5]], [[0, 3], [1, 2, 4], [5]]])
def test_folded_partial_sums_equal_fedavgs_weighted_mean(groups):
    rng = np.random.default_rng(0)
    replies = [_reply(rng, c) for c in range(6)]
    expected = aggregate_arrayrecords([r.content for r in replies], WEIGHT_KEY)
    released = []
    for group in groups:  # what each actor does: fold, strip, attach its sum to its last reply
        partial = WeightedSum()
        for client in group:
            reply = replies[client]
            partial.add(strip_arrays(reply), float(reply.content["metrics"][WEIGHT_KEY]))
            assert not reply.content.array_records
            released.append(reply)
        attach_sum(released[-1], partial)
    mean = folded_mean(released)
    for name, value in expected.items():
        assert mean[name].numpy().dtype == np.float32
        np.testing.assert_allclose(mean[name].numpy(), value.numpy(), rtol=1e-6, atol=1e-7)


def test_folded_mean_refuses_replies_outside_the_partial_sums():
    rng = np.random.default_rng(1)
    replies = [_reply(rng, c) for c in range(3)]
    partial = WeightedSum()
    for reply in replies[:2]:
        partial.add(strip_arrays(reply), 1.0)
    attach_sum(replies[1], partial)
    with pytest.raises(ValueError, match="partial sums cover 2 clients, but 3 replied"):
        folded_mean(replies)
