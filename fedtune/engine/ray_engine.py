"""Start a configured run on the fast engine: the ServerApp on long-lived Ray actors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from flwr.clientapp import ClientApp

from fedtune.client.app import app as fedtune_client_app
from fedtune.config import Config, to_run_config
from fedtune.engine.cohort import TrainFunction
from fedtune.engine.inprocess import run_inprocess
from fedtune.engine.ray_grid import RayGrid, prepare_driver
from fedtune.engine.ray_pool import ActorFactory, ray_session, start_actors
from fedtune.engine.shape import pool_size, runs_in_process
from fedtune.results.run_dir import RunDirectory
from fedtune.server.app import run_federated
from fedtune.server.reporting import Reporter
from fedtune.task import process_threads

RAY_RUN_ID = 1


@contextmanager
def ray_engine_grid(config: Config, client_app: ClientApp = fedtune_client_app,
                    train: TrainFunction | None = None) -> Iterator[RayGrid]:
    """A RayGrid whose actors have loaded their data and model; Ray is started here (or joined
    at ``engine.ray_address``), and actors and Ray stop on the way out, Ctrl-C included.
    ``client_app`` is the ClientApp the actors run for single messages and ``train`` what
    trains a client of a cohort (tests wrap fedtune's). With another ClientApp and no
    ``train``, every message goes through that ClientApp."""
    e = config.engine
    # the driver computes (server evaluation, phases run here) with a client's threads, and
    # Ray's local workers inherit the environment set here before it starts them
    with process_threads(e.client_cpus), ray_session(config):
        factory = ActorFactory(client_app, to_run_config(config), RAY_RUN_ID,
                               e.client_cpus, e.client_gpus, train, e.client_gpu_memory_mb)
        actors = start_actors(factory, pool_size(config, ray.cluster_resources()),
                              e.node_wait_s, meanwhile=lambda: prepare_driver(factory))
        grid = RayGrid(factory, actors, config.data.num_clients, e.client_timeout_s,
                       e.node_wait_s)
        grid.runs_cohorts = client_app is fedtune_client_app or train is not None
        try:
            yield grid
        finally:
            grid.close()


def run_ray_engine(config: Config, reporter: Reporter | None = None,
                   stop: threading.Event | None = None,
                   client_app: ClientApp = fedtune_client_app) -> RunDirectory:
    """The ``ray`` runtime: every round with the clients served by a pool of long-lived Ray
    actors, or - a cohort too small to pay for actors (``fedtune.engine.shape``) - by this
    process, as the ``inprocess`` runtime runs them (``stop``: see
    ``fedtune.engine.launch.launch``)."""
    if client_app is fedtune_client_app and runs_in_process(config):
        return run_inprocess(config, reporter, stop)
    with ray_engine_grid(config, client_app) as grid:
        return run_federated(grid, config, reporter, stop)
