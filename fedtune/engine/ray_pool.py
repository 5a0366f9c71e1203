"""The Ray side of the fast engine: the session, starting and stopping the actors (how many:
``fedtune.engine.shape.pool_size``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from flwr.clientapp import ClientApp

from fedtune.config import Config, ConfigError, RunConfigValue
from fedtune.engine.cohort import TrainFunction
from fedtune.engine.ray_worker import ClientWorker
from fedtune.engine.shape import local_cpus


@contextmanager
def ray_session(config: Config) -> Iterator[None]:
    """Start a quiet local Ray (no dashboard) or join ``engine.ray_address``;
    shut it down (or disconnect) on the way out, Ctrl-C included."""
    for name, value in (("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
                        ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(name, value)
    if ray.is_initialized():  # a caller's session (a notebook, a benchmark): leave it running
        yield
        return
    # workers' output comes to the driver, which the CLI sends to <run dir>/log.txt
    args: dict = {"log_to_driver": True, "logging_level": "ERROR",
                  "configure_logging": True}
    if config.engine.ray_address:
        args["address"] = config.engine.ray_address
    else:  # "local": a Ray of its own, even where `ray start` (or RAY_ADDRESS) names another
        args.update(address="local", num_cpus=local_cpus(), include_dashboard=False)
        if config.engine.client_gpus > 0:
            import torch

            args["num_gpus"] = torch.cuda.device_count()
    ray.init(**args)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class ActorFactory:
    """Starts ``ClientWorker`` actors with the run's resources and arguments."""

    client_app: ClientApp
    run_config: dict[str, RunConfigValue]
    run_id: int
    client_cpus: float
    client_gpus: float
    train: TrainFunction | None = None  # what trains a client in a block (None: fedtune's)
    gpu_memory_mb: int = 0  # each actor's GPU memory cap (0: its client_gpus share)

    def start(self) -> tuple[ray.actor.ActorHandle, ray.ObjectRef]:
        """A new actor and the reference its ``ready`` (data and model loaded) will fill."""
        remote = _REMOTE_WORKER.options(num_cpus=self.client_cpus, num_gpus=self.client_gpus,
                                        max_restarts=0)  # the grid replaces dead actors itself
        actor = remote.remote(self.client_app, self.run_config, self.run_id, self.client_cpus,
                              self.train, (self.client_gpus, self.gpu_memory_mb))
        return actor, actor.ready.remote()


_REMOTE_WORKER = ray.remote(ClientWorker)


def start_actors(factory: ActorFactory, count: int, wait_s: float,
                 meanwhile: Callable[[], None] | None = None) -> list[ray.actor.ActorHandle]:
    """Start ``count`` actors and wait until each has loaded its data and model (running
    ``meanwhile`` in this process while they load)."""
    started = [factory.start() for _ in range(count)]
    actors = [actor for actor, _ in started]
    if meanwhile is not None:
        meanwhile()
    done, _ = ray.wait([ready for _, ready in started], num_returns=count, timeout=wait_s)
    try:
        ray.get(done)  # raises what a failed start raised
    except BaseException:
        stop_actors(actors)
        raise
    if len(done) < count:
        stop_actors(actors)
        raise ConfigError(
            f"engine.node_wait_s = {wait_s:g} was too short: {len(done)} of {count} Ray actors "
            "loaded their data and model in time; raise it or lower engine.num_actors"
        )
    return actors


def stop_actors(actors: list[ray.actor.ActorHandle]) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
