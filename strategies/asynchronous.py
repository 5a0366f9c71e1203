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
- ``wanted``: how many more updates it takes before the server must update;
- ``receive_trained``: ``prepare`` then ``receive`` (what the event loop calls per update);
- ``receive_sum`` (a strategy whose ``takes_sums`` says so, instead of ``receive_trained``):
  take the updates of one training call - clients that started from one model and are heard
  in one server update, so with one staleness - as their sum, added up where they trained;
- ``release``: the new global model; ``release_metrics``: what it reports of that release.

Their state is plain attributes (numbers, numpy arrays), so a checkpoint of the strategy keeps
a half-full buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAvg

NDArrays = dict[str, np.ndarray]


class AsynchronousStrategy(FedAvg):
    """The steps an asynchronous event loop calls; subclasses define the update rule.
    ``takes_sums``: whether the loop hands it each training call's updates as their sum
    (``receive_sum``) instead of one by one (``receive_trained``)."""

    takes_sums: bool = False

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
        read-only); True when the global model must change now."""
        return self.receive(self.prepare(start, trained), staleness, weight, client)

    def receive_sum(self, start: Mapping[str, np.ndarray], total: Mapping[str, np.ndarray],
                    count: int, staleness: int) -> bool:
        """Take ``count`` updates that all started from ``start`` with this ``staleness`` as
        ``total``, the float64 sum of their trained models (``takes_sums``); True when the
        global model must change now."""
        raise NotImplementedError

    def wanted(self) -> int:
        """How many more updates it takes before the global model must change (at least 1)."""
        raise NotImplementedError

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        """The new global model from ``current`` and what was received."""
        raise NotImplementedError

    def release_metrics(self) -> dict[str, float]:
        """Metrics of the latest release (the strategy's MetricRecord of that server update)."""
        return {}


def same_dtype(values: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> NDArrays:
    """``values`` (float64 arithmetic) cast back to the dtypes of ``like``."""
    return {name: np.asarray(values[name]).astype(like[name].dtype, copy=False) for name in like}
