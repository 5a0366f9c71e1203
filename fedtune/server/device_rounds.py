"""Synchronous rounds on the virtual clock, the way production runs them (Bonawitz et al.
2019, "Towards federated learning at scale"): only clients available when the round starts
are sampled; with over-selection the round samples ceil(K (1 + f)) and keeps the first K to
finish; a client past the round deadline, or whose device goes offline before it is done, is
a straggler, dropped and recorded in clients.csv.

The clock knows each client's virtual duration before it trains (``fedtune.devices.clock``),
so the round picks who makes it first and trains only them: a straggler's work would be
discarded, so it is not computed (its state stays as it was), and the clients that make it
still train together in one cohort. The round ends when the K-th kept client finishes, or
at the deadline when fewer make it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedtune import protocol
from fedtune.config import Config, clients_per_round
from fedtune.devices.clock import NeverAvailable, VirtualClock
from fedtune.errors import ConfigError
from fedtune.results.run_dir import ClientRow, RoundRow
from fedtune.server.grid import WrappedGrid
from fedtune.server.identity import Identities
from fedtune.tables.devices import sampled_per_round


class AvailableNodes(WrappedGrid):
    """The grid as a strategy's sampling sees it: only the nodes of available clients."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        super().__init__(grid)
        self.nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


@dataclass
class RoundPlan:
    """Who trains in a round, who is dropped and why, and when the round ends."""

    kept: list[Message]
    start: float
    duration: dict[int, float]  # client id -> virtual duration
    dropped: list[tuple[int, str]]  # (client id, reason)
    end: float


class DeviceRounds:
    """The virtual clock of a synchronous run with devices."""

    def __init__(self, config: Config, clock: VirtualClock, identities: Identities) -> None:
        if not identities.fixed:
            raise ConfigError(
                f"devices.profile = {config.devices.profile!r} is not allowed on this runtime: "
                "must be 'none', or run on engine.backend = 'ray' or 'inprocess' (or a "
                "deployment with engine.node_ids): the clock must know which client each node "
                "is before it samples")
        self.clock = clock
        self.identities = identities
        self.keep = clients_per_round(config)
        self.sample = sampled_per_round(config, self.keep)
        self.deadline = config.strategy.round_deadline_s

    def sampling_grid(self, grid: Grid, now: float) -> tuple[Grid, float]:
        """A view of ``grid`` with the nodes of the clients available when the round starts
        (from ``now``, waiting on the virtual clock until enough are), and that start."""
        try:
            start = self.clock.first_time_with(self.sample, now)
        except NeverAvailable as error:
            raise RuntimeError(f"devices: {error}; lower strategy.fraction_train or "
                               "strategy.over_selection, or widen devices availability") from None
        clients = np.arange(self.clock.profiles.num_clients)
        available = set(clients[self.clock.available(clients, start)].tolist())
        nodes = [node for node, client in self.identities.node_to_client.items()
                 if client in available]
        return AvailableNodes(grid, sorted(nodes)), start

    def plan(self, messages: list[Message], start: float) -> RoundPlan:
        """Keep the first K of the sampled clients to finish within the deadline and before
        their device goes offline; the rest are stragglers."""
        if not messages:
            return RoundPlan([], start, {}, [], start)
        clients = np.array([self.identities.client_of(m.metadata.dst_node_id)
                            for m in messages], dtype=np.int64)
        size = protocol.array_bytes(messages[0])  # the model down, an update as large up
        duration = self.clock.durations(clients, size, size)
        finish = start + duration
        offline = self.clock.online_until(clients, start)
        late = duration > self.deadline if self.deadline else np.zeros(len(clients), bool)
        gone = finish > offline
        order = np.lexsort((clients, finish))  # by finish time, ties by client id
        eligible = [i for i in order if not late[i] and not gone[i]]
        kept = set(eligible[:self.keep])
        dropped = []
        for i in range(len(clients)):
            if i in kept:
                continue
            if gone[i]:
                reason = f"went offline {offline[i] - start:.6g} s into the round"
            elif late[i]:
                reason = f"needs {duration[i]:.6g} s, past strategy.round_deadline_s"
            else:
                reason = f"over-selected: {self.keep} clients finished first"
            dropped.append((int(clients[i]), reason))
        if len(kept) == self.keep or not self.deadline:
            end = float(max((finish[i] for i in kept), default=start))
        else:  # fewer than K make it: the server waits for the deadline
            end = start + self.deadline
        return RoundPlan([messages[i] for i in sorted(kept)], start,
                         dict(zip(clients.tolist(), duration.tolist(), strict=True)), dropped,
                         end)

    @staticmethod
    def settle(plan: RoundPlan, server_round: int, rows: list[ClientRow],
               row: RoundRow) -> list[ClientRow]:
        """The round's client rows with their virtual times, the stragglers' rows added, and
        the round row's clock and counts."""
        for client_row in rows:
            if client_row.client_id in plan.duration:
                client_row.virtual_start_s = plan.start
                client_row.virtual_duration_s = plan.duration[client_row.client_id]
                client_row.staleness = 0
        stragglers = [ClientRow(server_round, client, None, None, None, None, "straggler",
                                reason, virtual_start_s=plan.start,
                                virtual_duration_s=plan.duration[client], staleness=0)
                      for client, reason in plan.dropped]
        row.clients_sampled += len(stragglers)
        row.clients_failed += len(stragglers)
        row.virtual_time_s = plan.end
        return sorted(rows + stragglers, key=lambda r: (r.client_id is None, r.client_id or 0))
