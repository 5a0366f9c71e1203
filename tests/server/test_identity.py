"""Who a node is comes from the server: a simulation's map, pinned node ids, or a first claim."""

from __future__ import annotations

import pytest

from fedtune.client.app import app as client_app
from fedtune.config import ConfigError
from fedtune.engine.inprocess import InProcessGrid
from fedtune.server.identity import Identities, PinnedGrid, identify_nodes


def test_a_first_claim_sticks_and_a_taken_id_is_refused():
    identities = Identities({}, fixed=False)
    assert identities.claim(501, 0) is None and identities.client_of(501) == 0
    assert identities.claim(502, 0) == "partition-id = 0 belongs to node 501"
    assert identities.client_of(502) is None
    fixed = Identities({501: 0}, fixed=True)
    assert fixed.claim(777, 1) == "node 777 is not one of this run's clients"


def test_pinned_node_ids_hide_every_other_node():
    grid = InProcessGrid(client_app, {}, 4)  # nodes 1000..1003
    node_to_client: dict[int, int] = {}
    pinned, identities = identify_nodes(PinnedGrid(grid, grid.get_node_ids()),
                                        ["1002", "1000"], 2, node_to_client)
    assert isinstance(pinned, PinnedGrid)
    assert sorted(pinned.get_node_ids()) == [1000, 1002]  # 1001, 1003 are never sampled
    assert node_to_client == {1002: 0, 1000: 1} and identities.fixed
    with pytest.raises(ConfigError, match="must list one per client, data.num_clients = 3"):
        identify_nodes(PinnedGrid(grid, []), ["1002", "1000"], 3, {})


def test_a_simulation_knows_its_nodes_and_takes_no_pins():
    grid = InProcessGrid(client_app, {}, 3)
    node_to_client = {5: 2}  # e.g. from a tampered checkpoint: the grid's map wins
    same, identities = identify_nodes(grid, [], 3, node_to_client)
    assert same is grid and identities.fixed
    assert node_to_client == {}  # nothing of its own to keep or checkpoint
    assert dict(identities.node_to_client) == {1000: 0, 1001: 1, 1002: 2}
    assert identities.client_of(5) is None and identities.client_of(1003) is None
    with pytest.raises(ConfigError, match="engine.node_ids = \\['1'\\] is not allowed in a "
                                          "simulation"):
        identify_nodes(grid, ["1"], 3, {})
