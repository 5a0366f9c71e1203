"""GPU placement on a machine without GPUs: Ray's logical GPUs stand in for real ones."""

from __future__ import annotations

from collections import Counter

import pytest

from fedtune.config import ConfigError, to_run_config
from tests.conftest import tiny_config


@pytest.mark.slow
def test_actors_take_their_declared_gpu_share_of_logical_gpus(tmp_path):
    """engine.client_gpus = 0.5 on one (logical) GPU: the pool holds 2 actors, Ray gives both
    that GPU's id; a third does not fit (on 4 GPUs the same share makes room for 8)."""
    import ray

    from fedtune.client.app import app
    from fedtune.engine.ray_pool import ActorFactory, start_actors, stop_actors
    from fedtune.engine.shape import pool_size

    config = tiny_config(tmp_path, "engine.backend=ray", "engine.client_gpus=0.5",
                         "engine.client_cpus=0.5", "data.num_clients=8")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        cluster = ray.cluster_resources()
        assert pool_size(config, cluster) == 2
        assert pool_size(config, {**cluster, "GPU": 4.0}) == 8
        with pytest.raises(ConfigError, match="room for 2 actors"):
            pool_size(tiny_config(tmp_path, "engine.backend=ray", "engine.client_gpus=0.5",
                                  "engine.client_cpus=0.5", "engine.num_actors=3"), cluster)
        factory = ActorFactory(app, to_run_config(config), 1, 0.5, 0.5)
        actors = start_actors(factory, 2, 300)
        try:
            where = ray.get([actor.ready.remote() for actor in actors])
        finally:
            stop_actors(actors)
    finally:
        ray.shutdown()
    gpus = Counter(place.rsplit(":", 1)[1] for place in where)
    assert gpus == Counter({"0": 2}), where


GIB = 2**30


def test_gpu_memory_cap_is_the_declared_share_or_a_smaller_cap():
    """0 = the engine.client_gpus share of the GPU; a cap above the share is refused (the
    actors that share the GPU could run it out of memory together)."""
    from fedtune.engine.gpu_memory import memory_fraction

    assert memory_fraction(0.25, 0, 80 * GIB) == 0.25
    assert memory_fraction(1.0, 0, 80 * GIB) == 1.0
    assert memory_fraction(0.25, 10_240, 80 * GIB) == pytest.approx(0.125)
    assert memory_fraction(0.25, 20_480, 80 * GIB) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match=r"^engine.client_gpu_memory_mb = 20481 is not allowed "
                                          r"here: must be at most 20480, engine.client_gpus = "
                                          r"0.25 of this GPU's 81920 MiB"):
        memory_fraction(0.25, 20_481, 80 * GIB)


def test_gpu_memory_cap_needs_a_gpu_share(tmp_path):
    with pytest.raises(ConfigError, match=r"^engine.client_gpu_memory_mb = 1024 is not allowed "
                                          r"with engine.client_gpus = 0: must be 0"):
        tiny_config(tmp_path, "engine.backend=ray", "engine.client_gpu_memory_mb=1024")
    tiny_config(tmp_path, "engine.backend=ray", "engine.client_gpu_memory_mb=1024",
                "engine.client_gpus=0.5")
    with pytest.raises(ConfigError, match="engine.client_gpu_memory_mb"):
        tiny_config(tmp_path, "engine.backend=ray", "engine.client_gpu_memory_mb=-1",
                    "engine.client_gpus=0.5")


def test_a_client_past_the_gpu_memory_cap_fails_with_one_line_and_the_round_goes_on(
        tmp_path, monkeypatch, one_torch_thread):
    """torch's out-of-memory error inside a capped process (here raised by the client's
    training, as the capped allocator raises it on a GPU) becomes one line naming the cap in
    clients.csv; the other clients train and the run ends normally."""
    import torch

    from fedtune.client.app import app, train_client
    from fedtune.engine import gpu_memory
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated
    from tests.conftest import rows_of

    def greedy_client_two(resources, client_id, *args, **kwargs):
        if client_id == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_client(resources, client_id, *args, **kwargs)

    monkeypatch.setattr(gpu_memory, "_cap_mib", 2048.0)  # what cap_gpu_memory sets on CUDA
    config = tiny_config(tmp_path, "data.num_clients=4", "strategy.fraction_train=1",
                         "strategy.fraction_evaluate=0", "run.rounds=1", "run.save_best=false")
    grid = InProcessGrid(app, to_run_config(config), 4, train=greedy_client_two)
    rows = rows_of(run_federated(grid, config).path / "clients.csv")
    by_client = {int(r["client_id"]): r for r in rows}
    assert [by_client[c]["status"] for c in range(4)] == ["ok", "ok", "failed", "ok"]
    error = by_client[2]["reason"]
    assert error.startswith("fedtune.engine.gpu_memory.GpuMemoryCapExceeded: the client's GPU memory peak passed this "
                            "actor's cap of 2048 MiB (engine.client_gpu_memory_mb"), error
    assert "\n" not in error


def test_only_out_of_memory_errors_in_a_capped_process_are_explained():
    import torch

    from fedtune.engine.gpu_memory import GpuMemoryCapExceeded, explained

    other = ValueError("bad")
    assert explained(other, cap_mib=512.0) is other
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert explained(oom) is oom  # no cap in this process: torch's own error
    assert isinstance(explained(oom, cap_mib=512.0), GpuMemoryCapExceeded)
