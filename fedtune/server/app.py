"""Flower ServerApp: sets a run up and plays its rounds.

``run_federated`` builds what the run needs from its config - the resident task resources, the
privacy plan (σ, fixed once), the strategy, the privacy mode's server state - starts a run
directory (or resumes one from its checkpoint), waits for the clients, and hands the rounds to
the loop (``fedtune.server.loop``) with the standard listeners (``fedtune.server.listeners``).
The same function runs under every runtime: fedtune's engines call it with their own Grid,
Flower calls ``app`` (``flwr run``, a SuperLink).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, ConfigError, from_run_config
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.protocol import to_array_record
from fedtune.results.plots import plot_partitions
from fedtune.results.run_dir import RunDirectory
from fedtune.server.grid import SimulatedGrid
from fedtune.server.listeners import (
    AuditWriter,
    CentralizedReference,
    FinalArtifacts,
    NoUpdateStop,
    PrivacyStop,
    ProgressListener,
    RoundWriter,
)
from fedtune.server.loop import RunListener, run_rounds
from fedtune.server.reporting import LogReporter, Reporter
from fedtune.server.resume import Checkpointer, resume_state
from fedtune.server.round import FederatedRun, evaluate_global
from fedtune.server.state import RoundState
from fedtune.server.strategies import build_strategy
from fedtune.tables.privacy_modes import privacy_mode
from fedtune.task import TaskResources, task_resources


class NodesMissing(ConfigError):
    """Fewer nodes connected than data.num_clients within engine.node_wait_s."""


def wait_for_nodes(grid: Grid, needed: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() > deadline:
            raise NodesMissing(
                f"data.num_clients = {needed} but only {len(nodes)} client nodes connected "
                f"within engine.node_wait_s = {wait_s:g}s: start {needed} SuperNodes (for "
                f"`flwr run`, set options.num-supernodes = {needed} in the SuperLink "
                "connection) or lower data.num_clients"
            )
        time.sleep(0.5)


def new_run(config: Config, resources: TaskResources, grid: Grid, stateful: SimpleNamespace
            ) -> tuple[RunDirectory, RoundState, Checkpointer]:
    """A new run directory (config, env, partitions) and a freshly initialised global model."""
    run_dir = RunDirectory.create(config, config.run.dir or None)
    histogram = resources.federation.label_histogram()
    run_dir.write_partitions(histogram, resources.federation.data.label_names)
    if len(histogram):  # with private per-party files the server sees no partitions
        plot_partitions(histogram, resources.federation.data.label_names,
                        run_dir.plots_dir / "partitions.png")
    # a fresh model: the resident one may hold weights of an earlier run in this process
    arrays = to_array_record(shared_state(build_model(resources.spec, config.run.seed)))
    nodes = dict(grid.node_to_client) if isinstance(grid, SimulatedGrid) else {}
    state = RoundState(arrays, node_to_client=nodes)
    return run_dir, state, Checkpointer(run_dir.path, config, grid, stateful)


def run_federated(grid: Grid, config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None) -> RunDirectory:
    """Run every round of the configured federation on ``grid``; returns the run directory.

    Setting ``stop`` (from another thread) ends the run while it waits for replies, with
    ``fedtune.server.exchange.RunStopped``; whenever the run ends early, the last finished
    round is checkpointed.
    """
    reporter = reporter or LogReporter()
    torch.manual_seed(config.run.seed)
    resources = task_resources(config)
    mode = privacy_mode(config)
    plan = mode.plan(config)
    strategy = build_strategy(config, plan)
    privacy = mode.server(config, plan)
    stateful = SimpleNamespace(strategy=strategy, privacy=privacy)  # what checkpoints keep
    if config.run.resume:
        run_dir, state, checkpointer = resume_state(config, grid, stateful)
    else:
        run_dir, state, checkpointer = new_run(config, resources, grid, stateful)
    run = FederatedRun(config, grid, resources, strategy, privacy, state, reporter.phase, stop)
    artifacts = FinalArtifacts(run_dir, plan)
    reference = [CentralizedReference(artifacts)] if config.run.reference else []
    listeners: list[RunListener] = [
        NoUpdateStop(), PrivacyStop(), RoundWriter(run_dir), *reference, artifacts,
        AuditWriter(run_dir, plan), ProgressListener(reporter, run_dir, artifacts), checkpointer,
    ]
    for listener in listeners:
        listener.run_started(run)
    wait_for_nodes(grid, config.data.num_clients, config.engine.node_wait_s)
    run.started = time.perf_counter()
    final = run_rounds(run, listeners)
    if final is None:  # resumed after the last round: evaluate what the checkpoint holds
        final = evaluate_global(resources, state.arrays)
    for listener in listeners:
        listener.run_ended(run, final)
    return run_dir


def make_server_app(reporter: Reporter | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that reads its config from the run config (Flower's or fedtune's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, from_run_config(context.run_config), reporter, stop)

    return server_app


app = make_server_app()
