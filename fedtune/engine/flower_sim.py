"""Flower's own simulation runtime (Ray), started from Python for ``fedtune run``.

This is the runtime ``flwr run .`` uses. Clients receive the run config the way they do under
``flwr run``: as the app's declared config fused with the run's overrides. Outside a Flower
app folder that declaration is written to a temporary folder holding only a pyproject.toml.

Repeatable runs: Flower gives each SuperNode a random node id (``os.urandom``) and its
strategies sample from the node ids as the Grid lists them, so the same seed used to sample
other clients in every run. Here the ServerApp sees its Grid through ``PartitionOrderGrid``,
which lists node ids in partition order (SuperNode i holds partition i): the seeded sampling
then picks the same partitions every run, the ones fedtune's other runtimes pick.
"""

from __future__ import annotations

import os
import tempfile
import threading
from logging import WARNING
from pathlib import Path

import tomli_w
from flwr.app import Context, RecordDict
from flwr.common import log
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from fedtune.client.app import app as client_app
from fedtune.config import Config, from_run_config, to_run_config
from fedtune.results.run_dir import RunDirectory
from fedtune.server.app import run_federated
from fedtune.server.exchange import RunStopped
from fedtune.server.grid import WrappedGrid
from fedtune.server.reporting import Reporter


def backend_config(config: Config) -> dict:
    """Ray resources: each client gets engine.client_cpus cores and engine.client_gpus GPUs."""
    import torch

    # workers' output comes to the driver, which the CLI sends to <run dir>/log.txt; "local":
    # a Ray of its own, even where `ray start` (or RAY_ADDRESS) names another on this machine
    init_args: dict = {"address": "local", "num_cpus": os.cpu_count() or 1,
                       "logging_level": "ERROR", "log_to_driver": True}
    if torch.cuda.is_available():
        init_args["num_gpus"] = torch.cuda.device_count()
        if config.engine.client_gpus == 0 and config.client.device == "auto":
            log(WARNING, "a GPU is visible but engine.client_gpus = 0: Ray shows clients no "
                "GPU, so they train on CPU; set engine.client_gpus (0.125 = 8 share one GPU)")
    return {
        "client_resources": {"num_cpus": config.engine.client_cpus,
                             "num_gpus": config.engine.client_gpus},
        "init_args": init_args,
    }


class PartitionOrderGrid(WrappedGrid):
    """Flower's simulation Grid, listing its node ids in partition order.

    Flower's simulation registers SuperNode i (partition-id i) i-th, and its in-memory link
    state keeps nodes in registration order; ``get_node_ids`` returns them in that order
    instead of as a set ordered by their random values. Everything else is the wrapped Grid.
    """

    def get_node_ids(self) -> list[int]:
        online = set(self.grid.get_node_ids())
        registered = [node.node_id for node in self.grid.state.get_node_info()]
        return [node for node in registered if node in online]


def partition_order_server_app(reporter: Reporter | None,
                               stop: threading.Event | None) -> ServerApp:
    """fedtune's ServerApp, seeing Flower's simulation Grid in partition order."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(PartitionOrderGrid(grid), from_run_config(context.run_config), reporter,
                      stop)

    return server_app


def run_flower_simulation(config: Config, reporter: Reporter | None = None,
                          stop: threading.Event | None = None) -> bool:
    """Run the ServerApp and ClientApp under Flower's Ray simulation runtime; True if ``stop``
    (see ``fedtune.engine.launch.launch``) ended it."""
    run_config = to_run_config(config)
    # the same Run set-up flwr.simulation.run_simulation makes, plus our run config
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config)
    stop = stop or threading.Event()
    with tempfile.TemporaryDirectory(prefix="fedtune-app-") as app_dir:
        Path(app_dir, "pyproject.toml").write_text(tomli_w.dumps(app_declaration(run_config)))
        try:
            _run_simulation(
                num_supernodes=config.data.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=partition_order_server_app(reporter, stop),
                backend_config=backend_config(config),
                server_app_context=server_context,
                app_dir=app_dir,
                is_app=True,  # makes the runtime read the run config from app_dir
                run=run,
            )
        finally:
            requested = stop.is_set()
            stop.set()  # if the runtime died, the ServerApp thread must not wait for replies
    return requested


def run_flower(config: Config, reporter: Reporter | None = None,
               stop: threading.Event | None = None) -> RunDirectory:
    """The ``flower`` runtime: Flower's own Ray simulation (see ``run_flower_simulation``)."""
    if run_flower_simulation(config, reporter, stop):  # the ServerApp thread ended on stop
        raise RunStopped("stopped by request")
    return RunDirectory(Path(config.run.dir))


def app_declaration(run_config: dict) -> dict:
    """A minimal Flower app pyproject declaring ``run_config`` as the app's config."""
    return {
        "project": {"name": "fedtune-run", "version": "1.0.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.app:app",
                           "clientapp": "fedtune.client.app:app"},
            "config": run_config,
        }}},
    }
