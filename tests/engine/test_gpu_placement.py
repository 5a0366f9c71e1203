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
    from fedtune.engine.ray_pool import ActorFactory, pool_size, start_actors, stop_actors

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
