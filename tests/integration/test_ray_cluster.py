"""A two-node Ray cluster on 127.0.0.1 runs a simulation on the fast engine (its own module:
the engine must join this cluster, not the local Ray that test_ray_engine's fixture keeps)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from fedtune.engine.local_ray_node import start_node, stop_node, wait_for_nodes
from fedtune.server.app import run_federated
from tests.conftest import rows_of, tiny_config

PORT = 26379


def _forget_address(address_file: str, port: int) -> None:
    """A worker node's `ray start` may write the cluster's address to Ray's default temp dir
    too; remove it when it names this test's (stopped) cluster."""
    try:
        with open(address_file) as handle:
            ours = handle.read().strip().endswith(f":{port}")
    except OSError:
        return
    if ours:
        os.remove(address_file)


@pytest.mark.slow
def test_two_node_cluster_on_localhost(tmp_path):
    """`ray start --head` plus one worker node (one CPU each) on 127.0.0.1; the engine joins
    with engine.ray_address, and its two actors can only fit one on each node."""
    import ray
    from ray._private.utils import get_ray_address_file

    from fedtune.engine.ray_engine import ray_engine_grid

    address = f"127.0.0.1:{PORT}"
    # a short path: Ray's Unix sockets live under it (sun_path holds 107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="fedtune-ray-", dir="/tmp")
    nodes = [start_node("--num-cpus=1", "--head", f"--port={PORT}", "--include-dashboard=false",
                       f"--temp-dir={temp_dir}")]
    try:
        wait_for_nodes(address, 1, 120)
        nodes.append(start_node("--num-cpus=1", f"--address={address}"))
        wait_for_nodes(address, 2, 120)
        config = tiny_config(tmp_path, "engine.backend=ray", f"engine.ray_address={address}",
                             "data.num_clients=6")
        with ray_engine_grid(config) as grid:
            assert sum(node["Alive"] for node in ray.nodes()) == 2 and grid.actor_count == 2
            run_dir = run_federated(grid, config).path
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
        _forget_address(get_ray_address_file(None), PORT)
    rows = rows_of(run_dir / "clients.csv")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert len(rows_of(run_dir / "metrics.csv")) == 2
