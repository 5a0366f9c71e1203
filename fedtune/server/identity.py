"""Who sent a reply: the server's own map from node id to client id, never the reply's word.

What the server can know depends on the runtime:

- fedtune's simulations (``SimulatedGrid``) made every node themselves, so their
  ``node_to_client`` is the truth; a reply whose ``partition-id`` differs is rejected.
- A deployment knows its SuperNodes by node id, and a node id stands for the key registered
  with ``flwr supernode register`` (node authentication). ``engine.node_ids`` lists them in
  client order; the server then samples only those nodes (``PinnedGrid``) and client ``i`` is
  whoever holds the key of ``node_ids[i]``.
- Without that list (Flower's own simulation, a deployment that did not pin its nodes) the
  server knows nothing but node ids: a node is identified by the partition id of its first
  sound reply and keeps it for the run; a second node claiming a taken id is rejected. What a
  node declares the first time is trusted there, and docs/guide/hostile-clients.md says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flwr.serverapp import Grid

from fedtune.config import ConfigError
from fedtune.server.grid import SimulatedGrid, WrappedGrid


class Identities:
    """The node -> client map of a run: a simulation's grid's own (``NodeRange``: nothing to
    checkpoint), or the pinned and claimed ``RoundState.node_to_client`` (checkpointed)."""

    def __init__(self, node_to_client: Mapping[int, int], fixed: bool) -> None:
        """``fixed``: the map is complete (a simulation's or ``engine.node_ids``), so no node
        may claim an identity."""
        self.node_to_client = node_to_client
        self.fixed = fixed

    def client_of(self, node: int) -> int | None:
        """The client the server holds for ``node`` (None: not known yet)."""
        return self.node_to_client.get(node)

    def claim(self, node: int, claimed: int) -> str | None:
        """Let an unknown node be client ``claimed``; why not, where it may not."""
        if self.fixed:
            return f"node {node} is not one of this run's clients"
        holder = next((n for n, c in self.node_to_client.items() if c == claimed), None)
        if holder is not None:
            return f"partition-id = {claimed} belongs to node {holder}"
        self.node_to_client[node] = claimed
        return None


def pinned_nodes(node_ids: Sequence[str], num_clients: int) -> dict[int, int]:
    """``engine.node_ids`` as node id -> client id."""
    if len(node_ids) != num_clients:
        raise ConfigError(f"engine.node_ids has {len(node_ids)} node ids: must list one per "
                          f"client, data.num_clients = {num_clients}")
    nodes = {int(node): client for client, node in enumerate(node_ids)}
    if len(nodes) != len(node_ids):
        raise ConfigError(f"engine.node_ids = {list(node_ids)!r} is not allowed: must not "
                          "repeat a node id")
    return nodes


def identify_nodes(grid: Grid, node_ids: Sequence[str], num_clients: int,
                   node_to_client: dict[int, int]) -> tuple[Grid, Identities]:
    """The Grid the rounds use and who its nodes are: a simulation's own map, the pinned
    ``engine.node_ids`` (the Grid then shows only them), or first claims (``node_to_client``
    keeps those a checkpoint restored)."""
    if isinstance(grid, SimulatedGrid):
        if node_ids:
            raise ConfigError(f"engine.node_ids = {list(node_ids)!r} is not allowed in a "
                              "simulation: must be [] (the runtime made its clients' nodes)")
        node_to_client.clear()  # the grid's own map is the truth; nothing to keep (or save)
        return grid, Identities(grid.node_to_client, fixed=True)
    if node_ids:
        pinned = pinned_nodes(node_ids, num_clients)
        node_to_client.clear()
        node_to_client.update(pinned)
        return PinnedGrid(grid, pinned), Identities(node_to_client, fixed=True)
    return grid, Identities(node_to_client, fixed=False)


class PinnedGrid(WrappedGrid):
    """A Grid that shows only the pinned nodes, so no other node is ever sampled."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        super().__init__(grid)
        self.nodes = frozenset(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.grid.get_node_ids() if node in self.nodes]
