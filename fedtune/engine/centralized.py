"""The ``central`` runtime: no federation, the centralized reference (``fedtune.centralized``)
written to the same run directory contract."""

from __future__ import annotations

import threading

from fedtune.centralized import train_centralized
from fedtune.config import Config
from fedtune.results.run_dir import RunDirectory
from fedtune.server.exchange import RunStopped
from fedtune.server.reporting import Reporter
from fedtune.task import limit_threads


def run_central(config: Config, reporter: Reporter | None = None,
                stop: threading.Event | None = None) -> RunDirectory:
    """Train ``config`` on the pooled client data in this process, with the torch threads of
    ``engine.client_cpus``; ``stop`` ends it after the current round (``RunStopped``: the
    finished rows are on disk, there is no checkpoint)."""
    limit_threads(config.engine.client_cpus)
    run_dir, outcome = train_centralized(config, reporter, stop)
    if outcome.stopped:
        raise RunStopped(f"the centralized run in {run_dir.path} was stopped")
    return run_dir
