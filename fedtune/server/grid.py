"""What the server may ask of a simulated runtime's Grid, beyond Flower's ``Grid``.

Flower's ``Grid`` (push messages, pull replies) is all a SuperLink offers. fedtune's own
simulation runtimes (``fedtune.engine``) keep every client's ``Context.state`` themselves, in a
``fedtune.state.store.ClientStateStore``, so their Grids also implement ``SimulatedGrid``: the
server opens the store in the run directory, checkpoints it and restores it on resume, and
drops what it stopped waiting for. The server checks for this interface with ``isinstance``; a
runtime that does not implement it (Flower's simulation, a real deployment) keeps client states
to itself.

A ``CohortGrid`` also runs a whole round's cohort at once (``run_cohort``): given the messages a
strategy configured, it trains or evaluates every addressed client with the client wing's own
functions, screens each update where the client ran, and - when the strategy opts into the
summing aggregator (``fedtune.server.summing``) - returns the sum of ``weight × update`` instead
of one update per client. No Flower message is built per client: the phase gets one
``ClientReport`` per client, as from the replies of any other Grid (``fedtune.server.phases``).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.server.reports import ClientReport
from fedtune.state.store import ClientStateStore

if TYPE_CHECKING:  # screening builds on the grid's node map (server.identity)
    from fedtune.server.screening import ReplyLimits


class NodeRange(Mapping[int, int]):
    """A simulation's node -> client map, ``node = first + client`` for ``count`` clients, in
    constant memory: a dict of a million registered clients would hold ~100 MB."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count

    def __getitem__(self, node: int) -> int:
        if not (isinstance(node, int) and self.first <= node < self.first + self.count):
            raise KeyError(node)
        return node - self.first

    def __contains__(self, node: object) -> bool:
        return isinstance(node, int) and self.first <= node < self.first + self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.first + self.count))

    def __len__(self) -> int:
        return self.count

    def node_of(self, client: int) -> int:
        """The node of ``client`` (the inverse map, in constant memory too)."""
        if not 0 <= client < self.count:
            raise KeyError(client)
        return self.first + client


class SimulatedGrid(Grid):
    """A Grid whose nodes are virtual clients this process controls."""

    _run: Run
    node_to_client: Mapping[int, int]  # node id -> client id (its partition)
    client_states: ClientStateStore  # every client's Context.state, by client id

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @abstractmethod
    def discard(self, message_ids: Iterable[str]) -> None:
        """Forget messages the server stopped waiting for; replies that still come are
        dropped."""


class WrappedGrid(Grid):
    """A Grid that passes every call to the ``grid`` it wraps; subclasses change what they
    must (which nodes ``get_node_ids`` shows)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


@dataclass
class CohortResult:
    """What ``run_cohort`` returns for one phase of a round: a report per addressed client, by
    client id (an accepted update kept one by one is its report's ``update``), or with
    ``CohortSpec.weighted_mean`` the accepted updates' sum."""

    reports: list[ClientReport]
    total: dict[str, np.ndarray] | None = None  # sum of num-examples × update, float64
    total_weight: float = 0.0


@dataclass(frozen=True)
class CohortSpec:
    """How a cohort's replies are screened and reduced."""

    weighted_mean: bool  # sum the accepted updates, weighted by num-examples; else keep each
    limits: ReplyLimits  # the run's exact reply schemas and its clients' sizes


class CohortGrid(SimulatedGrid):
    """A SimulatedGrid that runs a round's whole cohort in one call (when ``runs_cohorts``:
    its clients run fedtune's own client code)."""

    runs_cohorts: bool = True

    @abstractmethod
    def run_cohort(self, messages: list[Message], spec: CohortSpec, timeout_s: float,
                   progress: Callable[[int, int], None] | None = None,
                   stop: threading.Event | None = None) -> CohortResult:
        """Train or evaluate (the messages' type) every client the ``messages`` address (they
        share one content), screening and reducing the replies as ``spec`` says; clients not
        done within ``timeout_s`` are reported ``timeout``. ``stop`` being set ends the wait
        with ``fedtune.server.exchange.RunStopped``."""
