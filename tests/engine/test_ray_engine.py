"""fedtune's fast engine: pool sizing, faults, per-client state, 10,000 clients."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.client.app import app as fedtune_client_app
from fedtune.config import ConfigError, to_run_config
from fedtune.engine.shape import pool_size
from fedtune.server.app import run_federated
from tests import faulty_client
from tests.conftest import rows_of, tiny_config

RAY = ["engine.backend=ray"]


def test_pool_size_follows_the_cluster_and_the_config(tmp_path):
    config = tiny_config(tmp_path, *RAY, "data.num_clients=20")
    # a local run leaves one CPU to its driver (fedtune.engine.shape.default_actors)
    assert pool_size(config, {"CPU": 2.0}) == 1
    assert pool_size(config, {"CPU": 1.0}) == 1  # but always starts an actor
    assert pool_size(config, {"CPU": 8.0}) == 7
    assert pool_size(tiny_config(tmp_path, *RAY, "engine.client_cpus=0.5"), {"CPU": 2.0}) == 2
    assert pool_size(config, {"CPU": 64.0}) == 20  # never more actors than clients
    # on a cluster (the driver may run elsewhere) and for GPU actors every CPU serves actors
    cluster = tiny_config(tmp_path, *RAY, "data.num_clients=20",
                          "engine.ray_address=127.0.0.1:6379")
    assert pool_size(cluster, {"CPU": 2.0}) == 2
    gpu = tiny_config(tmp_path, *RAY, "data.num_clients=20", "engine.client_gpus=0.25")
    assert pool_size(gpu, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert pool_size(gpu, {"CPU": 4.0, "GPU": 1.0}) == 4
    # engine.num_actors wins, up to every CPU
    assert pool_size(tiny_config(tmp_path, *RAY, "engine.num_actors=1"), {"CPU": 8.0}) == 1
    assert pool_size(tiny_config(tmp_path, *RAY, "engine.num_actors=2"), {"CPU": 2.0}) == 2
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

    config = tiny_config(tmp_path, *RAY, "data.num_clients=8", "engine.client_timeout_s=10",
                         "engine.num_actors=2")
    with ray_engine_grid(config, faulty_client.app) as grid:
        run_dir = run_federated(grid, config).path
        assert grid.restarts >= 2 and grid.actor_count == 2
        store = grid.client_states
        trainings = {client: int(store.get(client)[faulty_client.COUNTER]["count"])
                     for client in store.clients()}
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    first = {client: rows[1, client]["status"] for client in range(8)}
    assert first == {0: "ok", 1: "failed", 2: "failed", 3: "timeout", 4: "ok", 5: "ok",
                     6: "ok", 7: "ok"}
    assert rows[1, 1]["reason"] == "RuntimeError: client 1 fails on purpose"
    assert "Ray actor died" in rows[1, 2]["reason"]
    assert "engine.client_timeout_s = 10s" in rows[1, 3]["reason"]
    assert [rows[2, client]["status"] for client in range(8)] == ["ok", "failed"] + ["ok"] * 6
    metrics = rows_of(run_dir / "metrics.csv")
    assert [(m["clients_ok"], m["clients_failed"]) for m in metrics] == [("5", "3"), ("7", "1")]
    # one count per successful training: across rounds, across replaced actors
    assert trainings == {0: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}


@pytest.mark.slow
def test_cohort_faults_are_reported_blocks_rejoin_and_match_a_clean_run(tmp_path, ray_two_cpus,
                                                                       one_torch_thread):
    """The same faults in the cohort path: a client that raises is failed, one that kills its
    actor and one that stalls past engine.client_timeout_s are found by running their blocks
    client by client; the other clients' updates, summed block by block in client order, give
    the model a run without those clients' failures gives in process (with one torch thread,
    as each actor trains: torch's matmuls give other bits with another thread count)."""
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.engine.ray_engine import ray_engine_grid

    config = tiny_config(tmp_path, *RAY, "data.num_clients=8", "engine.client_timeout_s=10",
                         "run.rounds=2", "engine.num_actors=2")
    with ray_engine_grid(config, train=faulty_client.faulty_train) as grid:
        assert grid.runs_cohorts
        run_dir = run_federated(grid, config).path
        assert grid.restarts >= 2 and grid.actor_count == 2
        store = grid.client_states
        trainings = {client: int(store.get(client)[faulty_client.COUNTER]["count"])
                     for client in store.clients()}
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    assert {c: rows[1, c]["status"] for c in range(8)} == {
        0: "ok", 1: "failed", 2: "failed", 3: "timeout", 4: "ok", 5: "ok", 6: "ok", 7: "ok"}
    assert rows[1, 1]["reason"] == "RuntimeError: client 1 fails on purpose"
    assert "Ray actor died" in rows[1, 2]["reason"]
    assert "engine.client_timeout_s = 10s" in rows[1, 3]["reason"]
    assert [rows[2, c]["status"] for c in range(8)] == ["ok", "failed"] + ["ok"] * 6
    assert trainings == {0: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}
    # in process, with the same failures: the same statuses and the same model, bit for bit
    clean = tiny_config(tmp_path / "clean", "data.num_clients=8", "run.rounds=2")
    local = InProcessGrid(fedtune_client_app, to_run_config(clean), 8,
                          train=faulty_client.in_process_faults)
    local_dir = run_federated(local, clean).path
    statuses = [r["status"].replace("timeout", "failed") for r in rows_of(run_dir / "clients.csv")]
    assert [r["status"] for r in rows_of(local_dir / "clients.csv")] == statuses
    ours = load_file(str(run_dir / "model" / "model.safetensors"))
    theirs = load_file(str(local_dir / "model" / "model.safetensors"))
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_ten_thousand_clients_with_a_hundred_per_round(tmp_path, ray_two_cpus):
    from fedtune.engine.ray_engine import run_ray_engine

    config = tiny_config(tmp_path, base=[
        *RAY, "engine.num_actors=1", "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=256",
        "model.hidden_sizes=[16]", "data.partitioner=iid", "data.num_clients=10000",
        "data.max_examples=0", "data.local_test_fraction=0", "client.local_steps=1",
        "strategy.fraction_train=0.01", "strategy.fraction_evaluate=0", "run.rounds=1",
    ])
    run_dir = run_ray_engine(config).path
    clients = rows_of(run_dir / "clients.csv")
    assert len(clients) == 100 and {r["status"] for r in clients} == {"ok"}
    assert len({r["client_id"] for r in clients}) == 100
    assert max(int(r["client_id"]) for r in clients) > 1000
    (metrics,) = rows_of(run_dir / "metrics.csv")
    assert metrics["clients_ok"] == "100" and 0 < float(metrics["eval_accuracy"]) <= 1


@pytest.mark.slow
def test_small_phases_run_in_the_driver_once_a_clients_time_is_known(tmp_path, ray_two_cpus,
                                                                      monkeypatch):
    """A phase whose client time saves less than Ray's cost of a phase (RAY_PHASE_S) runs in
    the driver; the first phase of each kind goes to the actors (nothing is known yet), and a
    large RAY_PHASE_S keeps everything after it in the driver."""
    from fedtune.engine import ray_grid
    from fedtune.engine.ray_engine import ray_engine_grid

    where: list[tuple[str, str]] = []
    in_driver = ray_grid.RayGrid._run_in_driver

    def run_in_driver(self, content, blocks, timeout_s, progress, stop=None):
        where.append((blocks[0].message_type, "driver"))
        return in_driver(self, content, blocks, timeout_s, progress, stop)

    monkeypatch.setattr(ray_grid.RayGrid, "_run_in_driver", run_in_driver)
    monkeypatch.setattr(ray_grid, "RAY_PHASE_S", 1e6)
    config = tiny_config(tmp_path, *RAY, "run.rounds=3", "strategy.fraction_evaluate=1")
    with ray_engine_grid(config, fedtune_client_app) as grid:
        run_federated(grid, config)
        assert set(grid._phase_client_s) == {"train", "evaluate"}
    # rounds 2 and 3: both phases in the driver (round 1's were measured on the actors)
    assert where == [("train", "driver"), ("evaluate", "driver")] * 2


@pytest.mark.slow
def test_a_huge_finite_update_is_refused_where_its_client_trained(tmp_path, ray_two_cpus):
    """Client 0 sends 3e38 in every weight on the Ray engine's cohort path (summed in the
    actors): the actor's screening rejects it, naming client 0, before it reaches the sum;
    the honest clients stay ok in every round and the model stays sane (before: round 1
    applied it and round 2 rejected every honest client for a non-finite train loss)."""
    from fedtune.engine.ray_engine import ray_engine_grid

    config = tiny_config(tmp_path, *RAY, "run.rounds=2")
    with ray_engine_grid(config, train=faulty_client.huge_update_train) as grid:
        assert grid.runs_cohorts
        run_dir = run_federated(grid, config).path
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    for server_round in (1, 2):
        assert rows[server_round, 0]["status"] == "rejected"
        assert "is absurd: more than 1e+06 x max(the global model's norm" in rows[
            server_round, 0]["reason"]
        assert [rows[server_round, c]["status"] for c in (1, 2, 3)] == ["ok"] * 3
    assert [m["model_update"] for m in rows_of(run_dir / "metrics.csv")] == ["applied"] * 2
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in model.values())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["strategy.name=fedbuff", "strategy.fedbuff_buffer_size=2", "strategy.concurrency=3"],
    ["strategy.fraction_train=0.5", "strategy.over_selection=0.5",
     "strategy.round_deadline_s=3"],
    # DP-FedBuff (seeded noise, NOT PRIVATE, so the two engines' releases can be compared)
    ["strategy.name=fedbuff", "strategy.fedbuff_buffer_size=2", "strategy.concurrency=3",
     "privacy.mode=central", "privacy.noise_multiplier=0.5", "privacy.clip_norm=1",
     "privacy.adaptive_clipping=false", "privacy.delta=1e-3",
     "privacy.insecure_reproducible_noise=true"]], ids=["fedbuff", "deadline", "dp_fedbuff"])
def test_devices_runs_on_the_ray_engine_match_the_in_process_run(tmp_path, ray_two_cpus, extra):
    """The virtual clock and the asynchronous loop ask the same of both engines' cohorts."""
    from fedtune.engine.inprocess import run_inprocess
    from fedtune.engine.ray_engine import ray_engine_grid

    devices = ["data.num_clients=6", "devices.profile=lognormal", "devices.slow_fraction=0.3",
               "run.rounds=3", *extra]
    reference = run_inprocess(tiny_config(tmp_path / "inprocess", *devices)).path
    config = tiny_config(tmp_path / "ray", *RAY, *devices)
    with ray_engine_grid(config, fedtune_client_app) as grid:
        run_dir = run_federated(grid, config).path
    for table in ("metrics.csv", "clients.csv"):
        ours, theirs = (
            [{k: v for k, v in row.items() if k not in ("wall_s", "duration_s")}
             for row in rows_of(run / table)] for run in (run_dir, reference))
        assert ours == theirs
    statuses = {row["status"] for row in rows_of(run_dir / "clients.csv")}
    assert "ok" in statuses
    assert (run_dir / "model/model.safetensors").read_bytes() == (
        reference / "model/model.safetensors").read_bytes()
