"""Start a configured run on the runtime its config names."""

from __future__ import annotations

import threading
from pathlib import Path

from fedtune.client_app import app as client_app
from fedtune.config import Config, to_run_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.results.run_dir import RunDirectory
from fedtune.rounds import RunStopped
from fedtune.server_app import Reporter, run_federated


def run_inprocess(config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None) -> RunDirectory:
    """Every client in this process, one after another (no Ray)."""
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    return run_federated(grid, config, reporter, stop)


def launch(config: Config, reporter: Reporter | None = None,
           stop: threading.Event | None = None) -> RunDirectory:
    """Run ``config`` on ``engine.backend``; ``config.run.dir`` must name the run directory.

    Setting ``stop`` ends the run after the client being waited for, with ``RunStopped`` and a
    checkpoint of the last finished round.
    """
    if config.engine.backend == "ray":
        from fedtune.engine.ray_engine import run_ray_engine

        return run_ray_engine(config, reporter, stop)
    if config.engine.backend == "inprocess":
        return run_inprocess(config, reporter, stop)
    from fedtune.engine.flower_sim import run_flower_simulation

    if run_flower_simulation(config, reporter, stop):  # the ServerApp thread ended on stop
        raise RunStopped("stopped by request")
    return RunDirectory(Path(config.run.dir))
