"""fedtune's fast engine: pool sizing, faults, per-client state, 10,000 clients."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from fedtune.config import ConfigError
from fedtune.engine.ray_pool import pool_size
from fedtune.server_app import run_federated
from tests import faulty_client
from tests.conftest import tiny_config

RAY = ["engine.backend=ray"]


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_pool_size_follows_the_cluster_and_the_config(tmp_path):
    config = tiny_config(tmp_path, *RAY, "data.num_clients=20")
    assert pool_size(config, {"CPU": 2.0}) == 2
    assert pool_size(tiny_config(tmp_path, *RAY, "engine.client_cpus=0.5"), {"CPU": 2.0}) == 4
    assert pool_size(config, {"CPU": 64.0}) == 20  # never more actors than clients
    gpu = tiny_config(tmp_path, *RAY, "data.num_clients=20", "engine.client_gpus=0.25")
    assert pool_size(gpu, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert pool_size(tiny_config(tmp_path, *RAY, "engine.num_actors=1"), {"CPU": 8.0}) == 1
    with pytest.raises(ConfigError, match="engine.num_actors = 3 is not allowed here: the Ray "
                                          "cluster has 2 CPUs and 0 GPUs, room for 2 actors"):
        pool_size(tiny_config(tmp_path, *RAY, "engine.num_actors=3"), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="room for 0 actors"):
        pool_size(gpu, {"CPU": 16.0})


@pytest.fixture(scope="module")
def ray_two_cpus():
    """One local Ray for this module's runs (the engine leaves a running session alone)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_faults_are_reported_the_run_finishes_and_state_survives(tmp_path, ray_two_cpus):
    """A client that raises, one that kills its actor, one that stalls past
    engine.client_timeout_s: each is reported in clients.csv, actors are replaced, the rounds
    complete with the other clients; Context.state lives across rounds and dead actors."""
    from fedtune.engine.ray_engine import ray_engine_grid

    config = tiny_config(tmp_path, *RAY, "data.num_clients=8", "engine.client_timeout_s=10")
    with ray_engine_grid(config, faulty_client.app) as grid:
        run_dir = run_federated(grid, config).path
        assert grid.restarts >= 2 and grid.actor_count == 2
        trainings = {grid.node_to_client[node]: int(state[faulty_client.COUNTER]["count"])
                     for node, state in grid.states.items()}
    rows = {(int(r["round"]), int(r["client_id"])): r for r in _rows(run_dir / "clients.csv")}
    first = {client: rows[1, client]["status"] for client in range(8)}
    assert first == {0: "ok", 1: "failed", 2: "failed", 3: "timeout", 4: "ok", 5: "ok",
                     6: "ok", 7: "ok"}
    assert rows[1, 1]["reason"] == "RuntimeError: client 1 fails on purpose"
    assert "Ray actor died" in rows[1, 2]["reason"]
    assert "engine.client_timeout_s = 10s" in rows[1, 3]["reason"]
    assert [rows[2, client]["status"] for client in range(8)] == ["ok", "failed"] + ["ok"] * 6
    metrics = _rows(run_dir / "metrics.csv")
    assert [(m["clients_ok"], m["clients_failed"]) for m in metrics] == [("5", "3"), ("7", "1")]
    # one count per successful training: across rounds, across replaced actors
    assert trainings == {0: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}


@pytest.mark.slow
def test_ten_thousand_clients_with_a_hundred_per_round(tmp_path, ray_two_cpus):
    from fedtune.engine.ray_engine import run_ray_engine

    config = tiny_config(tmp_path, base=[
        *RAY, "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=256",
        "model.hidden_sizes=[16]", "data.partitioner=iid", "data.num_clients=10000",
        "data.max_examples=0", "data.local_test_fraction=0", "client.local_steps=1",
        "strategy.fraction_train=0.01", "strategy.fraction_evaluate=0", "run.rounds=1",
    ])
    run_dir = run_ray_engine(config).path
    clients = _rows(run_dir / "clients.csv")
    assert len(clients) == 100 and {r["status"] for r in clients} == {"ok"}
    assert len({r["client_id"] for r in clients}) == 100
    assert max(int(r["client_id"]) for r in clients) > 1000
    (metrics,) = _rows(run_dir / "metrics.csv")
    assert metrics["clients_ok"] == "100" and 0 < float(metrics["eval_accuracy"]) <= 1


def _ray_node(*args: str) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so the test stops exactly the Ray
    processes it started (never `ray stop`, which stops every Ray on the machine)."""
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


@pytest.mark.slow
def test_two_node_cluster_on_localhost(tmp_path):
    """`ray start --head` plus one worker node (one CPU each) on 127.0.0.1; the engine joins
    with engine.ray_address, and its two actors can only fit one on each node."""
    import ray

    from fedtune.engine.ray_engine import ray_engine_grid

    address = "127.0.0.1:26379"
    nodes = [_ray_node("--head", "--port=26379", "--include-dashboard=false")]
    try:
        _wait_for_nodes(address, 1, 120)
        nodes.append(_ray_node(f"--address={address}"))
        _wait_for_nodes(address, 2, 120)
        config = tiny_config(tmp_path, *RAY, f"engine.ray_address={address}",
                             "data.num_clients=6")
        with ray_engine_grid(config) as grid:
            assert sum(node["Alive"] for node in ray.nodes()) == 2 and grid.actor_count == 2
            run_dir = run_federated(grid, config).path
    finally:
        for node in reversed(nodes):
            _stop(node)
    rows = _rows(run_dir / "clients.csv")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert len(_rows(run_dir / "metrics.csv")) == 2
