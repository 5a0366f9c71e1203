"""Hand-made train rounds for strategy tests: the messages a strategy sends, replies to them."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedtune.client.app import app as client_app
from fedtune.engine.inprocess import InProcessGrid


def record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def numpy_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def node_grid(num_nodes: int) -> InProcessGrid:
    """A Grid with ``num_nodes`` nodes; the tests push and answer its messages by hand."""
    return InProcessGrid(client_app, {}, num_nodes)


def configure(strategy: Strategy, grid: InProcessGrid, server_round: int,
              arrays: Mapping[str, np.ndarray], seed: int = 0) -> list[Message]:
    """The train messages of one round (sampling seeded), pushed so they can be replied to."""
    random.seed(seed)
    messages = list(strategy.configure_train(server_round, record(arrays), ConfigRecord(), grid))
    grid.push_messages(messages)
    return messages


def reply(message: Message, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float],
          extra: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Message:
    """A client's training reply: its model, metrics and any extra ArrayRecords by key."""
    content = RecordDict({"arrays": record(arrays), "metrics": MetricRecord(dict(metrics))})
    for key, value in (extra or {}).items():
        content[key] = record(value)
    return Message(content, reply_to=message)
