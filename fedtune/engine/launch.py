"""Start a configured run on the runtime its config names (``fedtune.tables.runtimes``)."""

from __future__ import annotations

import threading
from logging import INFO

from flwr.common import log

from fedtune.client.vectorised import VECTORISE_KEY, one_at_a_time_because
from fedtune.config import Config, ConfigError
from fedtune.results.run_dir import RunDirectory
from fedtune.results.tracking import check_tracking
from fedtune.server.reporting import Reporter
from fedtune.tables.datasets import DATASETS
from fedtune.tables.model_kinds import MODEL_KINDS
from fedtune.tables.privacy_modes import privacy_mode
from fedtune.tables.runtimes import RUNTIMES
from fedtune.task import task_resources


def launch(config: Config, reporter: Reporter | None = None,
           stop: threading.Event | None = None) -> RunDirectory:
    """Run ``config`` on ``engine.backend``; ``config.run.dir`` must name the run directory.

    Setting ``stop`` ends the run after the client being waited for, with
    ``fedtune.server.exchange.RunStopped`` and a checkpoint of the last finished round.
    """
    runtime = RUNTIMES[config.engine.backend]
    stage = getattr(reporter, "stage", _silent)  # a reporter written before stages: none
    loading = MODEL_KINDS[config.model.kind].loading
    stage("loading the data and the model" + (f" ({loading})" if loading else ""))
    preflight(config)
    if runtime.keys and VECTORISE_KEY in runtime.keys:
        reason = one_at_a_time_because(config)
        log(INFO, "fedtune: clients train %s", "together, a chunk at a time "
            "(engine.vectorise_clients)" if reason is None else f"one at a time: {reason}")
    stage(runtime.starting)
    return runtime.load()(config, reporter, stop)


def _silent(text: str) -> None:
    pass


def preflight(config: Config) -> None:
    """The checks that need the data or the accountant (client counts and sizes, the privacy
    plan), so they fail here, before any worker starts."""
    if DATASETS[config.data.dataset].party_files:
        raise ConfigError(
            f"data.dataset = {config.data.dataset!r} is not allowed with engine.backend = "
            f"{config.engine.backend!r}: each party's file comes from its own SuperNode "
            "(node config data-path), so it runs only in a deployment (docs/guide/deployment.md)"
        )
    check_tracking(config)
    task_resources(config)
    privacy_mode(config).plan(config)
