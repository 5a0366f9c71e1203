"""The Ray runtime's shape (fedtune/engine/shape.py) and the driver's threads for a whole run."""

from __future__ import annotations

import os

import pytest
import torch

from fedtune.config import load_config
from fedtune.engine import shape
from fedtune.engine.shape import largest_cohort, local_pool_is_one, runs_in_process
from tests.conftest import rows_of, tiny_config

TIMING = {"wall_s", "duration_s"}


def test_the_main_job_runs_in_process_and_a_large_cohort_on_actors(tmp_path, monkeypatch):
    monkeypatch.setattr(shape, "local_cpus", lambda: 8)  # a default pool of 7 actors
    main_job = load_config("simulations/quickstart.toml")
    assert main_job.engine.backend == "ray" and largest_cohort(main_job) == 2
    assert runs_in_process(main_job)
    hundred = tiny_config(tmp_path, "engine.backend=ray", "data.num_clients=400",
                          "strategy.fraction_train=0.25", "strategy.fraction_evaluate=0")
    assert largest_cohort(hundred) == 100 and not runs_in_process(hundred)
    # the evaluate phase counts too: 2 trained, 10 evaluated
    evaluated = tiny_config(tmp_path, "engine.backend=ray", "data.num_clients=20",
                            "strategy.fraction_train=0.1", "strategy.fraction_evaluate=0.5")
    assert largest_cohort(evaluated) == 10 and not runs_in_process(evaluated)
    at_threshold = tiny_config(tmp_path, "engine.backend=ray", "data.num_clients=8",
                               "strategy.fraction_train=1.0", "strategy.fraction_evaluate=0")
    assert not runs_in_process(at_threshold)  # 8 clients: the default threshold
    # asking for actors gets actors, whatever the cohort
    for asked in ("engine.actor_min_cohort=0", "engine.num_actors=1",
                  "engine.ray_address=127.0.0.1:6379", "engine.client_gpus=0.5"):
        config = load_config("simulations/quickstart.toml", [asked])
        assert not runs_in_process(config), asked


def test_a_default_pool_of_one_local_actor_starts_no_actor(tmp_path, monkeypatch):
    """engine.num_actors = 0 where the local pool would hold one actor (2 CPUs, one of them
    the driver's): the in-process run, whatever the cohort; actors asked for, a cluster, GPUs,
    a larger machine or larger actors' shares keep actors."""
    large = ["engine.backend=ray", "data.num_clients=400", "strategy.fraction_train=0.25"]
    config = tiny_config(tmp_path, *large, "engine.actor_min_cohort=0")
    for cpus, alone in ((1, True), (2, True), (3, False), (16, False)):
        monkeypatch.setattr(shape, "local_cpus", lambda cpus=cpus: cpus)
        assert local_pool_is_one(config) is alone and runs_in_process(config) is alone, cpus
    monkeypatch.setattr(shape, "local_cpus", lambda: 4)
    assert not runs_in_process(config)  # 3 actors
    assert runs_in_process(tiny_config(tmp_path, *large, "engine.client_cpus=2"))  # 1 of 2 CPUs
    assert not local_pool_is_one(tiny_config(tmp_path, *large, "engine.client_cpus=8"))  # none
    monkeypatch.setattr(shape, "local_cpus", lambda: 2)
    for asked in ("engine.num_actors=1", "engine.num_actors=2",
                  "engine.ray_address=127.0.0.1:6379", "engine.client_gpus=0.5"):
        assert not runs_in_process(tiny_config(tmp_path, *large, asked)), asked


def test_a_small_ray_run_is_the_in_process_run_with_the_clients_threads(tmp_path, monkeypatch):
    """engine.backend = ray with a 4-client cohort starts no Ray; the driver evaluates the
    global model with engine.client_cpus torch threads and OMP/MKL/OpenBLAS set alike, the caller's
    come back afterwards; metrics and clients equal the in-process runtime's bit for bit."""
    import ray

    from fedtune.engine.inprocess import run_inprocess
    from fedtune.engine.ray_engine import run_ray_engine
    from fedtune.server import round as server_round

    seen: list[tuple[int, str | None, bool]] = []
    evaluate_global = server_round.evaluate_global

    def watched(resources, arrays):
        seen.append((torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"),
                     os.environ.get("OPENBLAS_NUM_THREADS"), ray.is_initialized()))
        return evaluate_global(resources, arrays)

    monkeypatch.setattr(server_round, "evaluate_global", watched)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ray_dir = run_ray_engine(tiny_config(tmp_path / "r", "engine.backend=ray")).path
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in os.environ
        assert "OPENBLAS_NUM_THREADS" not in os.environ
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, "1", "1", False)] * 2  # two rounds, one thread, no Ray
    local_dir = run_inprocess(tiny_config(tmp_path / "l")).path
    for name in ("metrics.csv", "clients.csv"):
        ours, theirs = rows_of(ray_dir / name), rows_of(local_dir / name)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert {k: v for k, v in a.items() if k not in TIMING} == {
                k: v for k, v in b.items() if k not in TIMING}


@pytest.mark.slow
def test_the_ray_driver_evaluates_with_the_clients_threads(tmp_path, monkeypatch):
    """On actors too, the driver's torch threads are engine.client_cpus's for the whole run
    (the server's evaluation here), and its Ray workers started with that environment."""
    import ray

    from fedtune.engine.ray_engine import run_ray_engine
    from fedtune.server import round as server_round

    seen: list[tuple[int, bool]] = []
    evaluate_global = server_round.evaluate_global

    def watched(resources, arrays):
        seen.append((torch.get_num_threads(), ray.is_initialized()))
        return evaluate_global(resources, arrays)

    monkeypatch.setattr(server_round, "evaluate_global", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_ray_engine(tiny_config(tmp_path, "engine.backend=ray", "engine.num_actors=1",
                                   "run.rounds=1"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, True)]
