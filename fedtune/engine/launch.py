"""Start a configured run on the in-process runtime."""

from __future__ import annotations

from fedtune.client_app import app as client_app
from fedtune.config import Config, to_run_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.results.run_dir import RunDirectory
from fedtune.server_app import Reporter, run_federated


def run_inprocess(config: Config, reporter: Reporter | None = None) -> RunDirectory:
    """Every client in this process, one after another (no Ray)."""
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    return run_federated(grid, config, reporter)
