"""A two-node Ray cluster on 127.0.0.1 runs a simulation on the fast engine (its own module:
the engine must join this cluster, not the local Ray that test_ray_engine's fixture keeps)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from fedtune.server.app import run_federated
from tests.conftest import rows_of, tiny_config

PORT = 26379


def _ray_node(*args: str) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so the test stops exactly the Ray
    processes it started (never `ray stop`, which stops every Ray on the machine). The head
    gets its own --temp-dir: `ray start --head` writes its address there, where a later plain
    `ray.init()` elsewhere on the machine would otherwise find it and try to join."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--disable-usage-stats", *args],
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(node: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
            node.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(node["Alive"] for node in ray.nodes())
            ray.shutdown()
            if alive >= count:
                return
        except ConnectionError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes at {address} did not come up in {timeout_s:g}s")


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
    nodes = [_ray_node("--head", f"--port={PORT}", "--include-dashboard=false",
                       f"--temp-dir={temp_dir}")]
    try:
        _wait_for_nodes(address, 1, 120)
        nodes.append(_ray_node(f"--address={address}"))
        _wait_for_nodes(address, 2, 120)
        config = tiny_config(tmp_path, "engine.backend=ray", f"engine.ray_address={address}",
                             "data.num_clients=6")
        with ray_engine_grid(config) as grid:
            assert sum(node["Alive"] for node in ray.nodes()) == 2 and grid.actor_count == 2
            run_dir = run_federated(grid, config).path
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
        _forget_address(get_ray_address_file(None), PORT)
    rows = rows_of(run_dir / "clients.csv")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert len(rows_of(run_dir / "metrics.csv")) == 2
