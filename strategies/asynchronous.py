"""What an asynchronous strategy offers an event loop, beside Flower's ``Strategy``.

Flower's strategies are round-based: configure every sampled node, aggregate every reply. An
asynchronous server instead starts a client whenever another finishes and takes each update as
it arrives, however stale (the server updates made since the client fetched its model). An
``AsynchronousStrategy`` is a FedAvg subclass (Flower's sampling and federated evaluation)
with more steps, which an event loop calls:

- ``start_messages``: train messages for the given nodes, carrying the current model;
- ``prepare``: what to take of one client's trained model (called when the server receives
  it, with the model it started from);
- ``refuses``: why it will not take a client's update now ("" = it will);
- ``receive``: take one update and its staleness; True when the server must update now;
- ``receive_trained``: ``prepare`` then ``receive`` (what the event loop calls); a strategy may
  defer its arithmetic to ``settle``, which the loop calls at the end of every server update,
  and sum the trained models it takes with an ``OrderedSum`` made by ``ordered_sum`` (the
  loop plugs in one that adds them as they arrive, reading a model held as a row of a
  cohort's stacked arrays in place);
- ``release``: the new global model; ``release_metrics``: what it reports of that release.

Their state is plain attributes (numbers, numpy arrays), so a checkpoint of the strategy keeps
a half-full buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAvg

NDArrays = dict[str, np.ndarray]


def sums_in_order(models: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> NDArrays:
    """For each of ``names``, ``models[0][name] + models[1][name] + ...`` in float64, one
    addition per model in order (the bits every ``OrderedSum`` gives)."""
    totals = {name: np.zeros(np.shape(models[0][name])) for name in names}
    add_in_order(totals, models)
    return totals


def add_in_order(totals: NDArrays, models: Iterable[Mapping[str, np.ndarray]]) -> None:
    """``totals[name] += model[name]`` in float64 for each model in order, in place."""
    for model in models:
        for name, total in totals.items():
            np.add(total, model[name], out=total)


class OrderedSum:
    """The float64 sum, tensor by tensor, of the models ``add``ed, with the bits of adding
    them one by one in that order (``sums_in_order``); ``result`` once, after the last. This
    one keeps the models (by reference) and adds them at ``result``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.models: list[Mapping[str, np.ndarray]] = []

    def add(self, model: Mapping[str, np.ndarray]) -> None:
        self.models.append(model)

    def result(self) -> NDArrays:
        return sums_in_order(self.models, self.names)


class AsynchronousStrategy(FedAvg):
    """The steps an asynchronous event loop calls; subclasses define the update rule.
    ``ordered_sum``: what sums the models a strategy takes (configuration, which the loop may
    replace: never checkpointed)."""

    ordered_sum: Callable[[Sequence[str]], OrderedSum] = OrderedSum

    def start_messages(self, server_round: int, arrays: ArrayRecord,
                       node_ids: Iterable[int], dispatch: int = 0) -> list[Message]:
        """Train messages for ``node_ids``, all sharing one content (the current model and
        ``dispatch``, the event loop's training call, which seeds the clients' batches)."""
        config = ConfigRecord({"server-round": server_round, "dispatch": dispatch})
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(content, list(node_ids), MessageType.TRAIN))

    def prepare(self, start: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
                ) -> NDArrays:
        """What to keep of a client's trained model (``start``: the model it began from)."""
        raise NotImplementedError

    def refuses(self, client: int) -> str:
        """Why this client's update cannot be received now ("" = it can)."""
        return ""

    def receive(self, kept: Mapping[str, np.ndarray], staleness: int, weight: float,
                client: int = -1) -> bool:
        """Take one client's ``prepare``d result; True when the global model must change now."""
        raise NotImplementedError

    def receive_trained(self, start: Mapping[str, np.ndarray],
                        trained: Mapping[str, np.ndarray], staleness: int, weight: float,
                        client: int = -1) -> bool:
        """``receive`` a client's trained model (``start``: the model it began from; both
        read-only, alive until ``settle``); True when the global model must change now."""
        return self.receive(self.prepare(start, trained), staleness, weight, client)

    def settle(self) -> None:
        """Finish what ``receive_trained`` deferred: the event loop calls it at the end of
        every server update, before ``release`` and before a checkpoint captures the state."""

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        """The new global model from ``current`` and what was received."""
        raise NotImplementedError

    def release_metrics(self) -> dict[str, float]:
        """Metrics of the latest release (the strategy's MetricRecord of that server update)."""
        return {}


def same_dtype(values: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> NDArrays:
    """``values`` (float64 arithmetic) cast back to the dtypes of ``like``."""
    return {name: np.asarray(values[name]).astype(like[name].dtype, copy=False) for name in like}
