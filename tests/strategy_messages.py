"""Hand-made train rounds for strategy tests: the messages a strategy sends, replies to them."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import Strategy

from fedtune.client.app import app as client_app
from fedtune.config import load_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.privacy.mode import PrivacyPlan
from fedtune.server.build_strategy import build_strategy
from fedtune.tables.strategies import FLOWER, STRATEGIES

NUM_NODES = 5


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


def _global(rng):
    return {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32)}


def two_rounds(strategy, num_nodes=NUM_NODES, seed=0):
    """Two rounds on the same hand-made replies; returns (train configs, aggregates, metrics)."""
    rng = np.random.default_rng(seed)
    grid = node_grid(num_nodes)
    arrays = _global(rng)
    configs, aggregates, metrics = [], [], []
    for server_round in (1, 2):
        messages = configure(strategy, grid, server_round, arrays)
        configs.append(dict(messages[0].content["config"]))
        replies = []
        for i, message in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id)):
            local = {k: v + rng.normal(scale=0.1 * (i + 1), size=v.shape).astype(np.float32)
                     for k, v in arrays.items()}
            replies.append(reply(message, local, {"num-examples": 10 + 7 * i,
                                                  "train-loss": 1.0 / (i + 1)}))
        new_arrays, new_metrics = strategy.aggregate_train(server_round, copy.deepcopy(replies))
        arrays = numpy_of(new_arrays)
        aggregates.append(arrays)
        metrics.append(dict(new_metrics))
    return configs, aggregates, metrics


def assert_flowers_own(name: str, overrides: list[str], arguments: dict, *,
                       differs_from_fedavg: bool = True, num_nodes: int = NUM_NODES) -> None:
    """A strategy that is Flower's own class, reached through fedtune with ``overrides``: the
    same class as Flower's built with ``arguments`` (the hyper-parameters the overrides set,
    under Flower's names; give values away from the defaults so that one not passed on
    shows), the same train config, aggregates and metrics on two hand-made rounds; and
    (``differs_from_fedavg``) a really different aggregate from FedAvg's."""
    config = load_config(None, [f"data.num_clients={num_nodes}", "strategy.fraction_train=1.0",
                                f"strategy.name={name}", *overrides])
    built = build_strategy(config, PrivacyPlan())
    flowers_class = STRATEGIES[name].load()
    assert STRATEGIES[name].implementation.startswith(FLOWER)
    assert type(built) is flowers_class
    direct = flowers_class(min_available_nodes=num_nodes, **arguments)
    ours, theirs = two_rounds(built, num_nodes), two_rounds(direct, num_nodes)
    assert ours[0] == theirs[0]  # same train config (e.g. FedProx's proximal-mu)
    for mine, flowers in zip(ours[1], theirs[1], strict=True):
        assert mine.keys() == flowers.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], flowers[key])
    assert ours[2] == theirs[2]
    if differs_from_fedavg:
        fedavg = two_rounds(flower.FedAvg(min_available_nodes=num_nodes), num_nodes)
        assert not np.allclose(ours[1][1]["w"], fedavg[1][1]["w"])
