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
from logging import WARNING
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, ConfigError, from_run_config, keys_without_effect
from fedtune.devices.clock import VirtualClock
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.personal.base import personal_evaluation_on
from fedtune.personal.split import kept_names
from fedtune.privacy.mode import PrivacyPlan
from fedtune.protocol import to_array_record
from fedtune.results.lock import RunLock
from fedtune.results.plots import plot_partitions
from fedtune.results.run_dir import RunDirectory
from fedtune.results.tracking import trackers
from fedtune.server.async_loop import AsyncLoop, AsyncRound
from fedtune.server.build_strategy import build_strategy
from fedtune.server.device_rounds import DeviceRounds
from fedtune.server.grid import SimulatedGrid
from fedtune.server.identity import identify_nodes
from fedtune.server.listeners import (
    AuditWriter,
    BestModel,
    CentralizedReference,
    FinalArtifacts,
    NoUpdateStop,
    PrivacyStop,
    ProgressListener,
    RoundWriter,
    Tracking,
    UserCallbacks,
)
from fedtune.server.loop import Play, RunListener, run_rounds
from fedtune.server.node_state import NodeStateGrid, new_run_key
from fedtune.server.personal_eval import PersonalEvaluation
from fedtune.server.reporting import LogReporter, Reporter
from fedtune.server.resume import Checkpointer, resume_state
from fedtune.server.round import FederatedRun, play_round
from fedtune.server.secagg_plus import SecAggPlus
from fedtune.server.secagg_recorder import SecAggRecorder
from fedtune.server.state import RoundState
from fedtune.tables.devices import devices_on
from fedtune.tables.privacy_modes import privacy_mode
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources, task_resources

# a SuperLink (flwr run, a deployment) names its nodes with random ids, which Flower's
# strategies sample from: the same seed samples other clients in each run
SUPERLINK_RUNTIME = {"backend": "flwr run (a SuperLink)", "reproducible": False,
                     "note": "Flower samples clients from random node ids: other clients "
                             "train in each run of the same config"}


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
    state = RoundState(arrays, run_key=new_run_key())  # a simulation's nodes: its grid's
    return run_dir, state, Checkpointer(run_dir.path, config, grid, stateful)


def run_federated(grid: Grid, config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None,
                  runtime: dict[str, Any] | None = None) -> RunDirectory:
    """Run every round of the configured federation on ``grid``; returns the run directory.

    Setting ``stop`` (from another thread) ends the run while it waits for replies, with
    ``fedtune.server.exchange.RunStopped``; whenever the run ends early, the last finished
    round is checkpointed. ``runtime``: summary.json's runtime section, when the runtime is
    not the one ``engine.backend`` names (a SuperLink's, under ``flwr run``).
    """
    reporter = reporter or LogReporter()
    torch.manual_seed(config.run.seed)
    resources = task_resources(config)
    mode = privacy_mode(config)
    plan = mode.plan(config)
    entry = STRATEGIES[config.strategy.name]  # SecAgg+ leaves a personal part out of its sum
    strategy = build_strategy(config, plan, resources.max_train_examples(), kept_names(
        lambda: resources.model, entry.personal_part, entry.shared_part))
    privacy = mode.server(config, plan,
                          resources.federation.train_sizes.tolist())
    stateful = SimpleNamespace(strategy=strategy, privacy=privacy)  # what checkpoints keep
    asynchronous = STRATEGIES[config.strategy.name].asynchronous
    clock = None
    if asynchronous or devices_on(config):  # the virtual clock of the clients' devices
        clock = VirtualClock.for_config(config, resources.federation.train_sizes)
    if asynchronous:  # the event loop's state is checkpointed beside the strategy's
        stateful.async_loop = AsyncLoop(config, clock)
    # one writer per run directory, from before anything in it is read or written
    lock = RunLock(Path(config.run.dir)).acquire() if config.run.dir else None
    try:
        if config.run.resume:
            run_dir, state, checkpointer = resume_state(config, grid, stateful)
        else:
            run_dir, state, checkpointer = new_run(config, resources, grid, stateful)
        lock = lock or RunLock(run_dir.path).acquire()
        grid, identities = identify_nodes(grid, config.engine.node_ids,
                                          config.data.num_clients, state.node_to_client)
        if not isinstance(grid, SimulatedGrid):  # SuperNodes keep their own clients' state
            grid = NodeStateGrid(grid, state.run_key, state.server_round,
                                 lambda: max(checkpointer.written_round, 0))
        devices = DeviceRounds(config, clock, identities) if (
            clock is not None and not asynchronous) else None
        run = FederatedRun(config, grid, resources, strategy, privacy, state, reporter.phase,
                           stop, identities=identities, devices=devices)
        play = AsyncRound(run, stateful.async_loop, clock) if asynchronous else play_round
        play_all_rounds(run, run_dir, plan, reporter, checkpointer, runtime, play)
    finally:
        if lock is not None:
            lock.release()
    return run_dir


def play_all_rounds(run: FederatedRun, run_dir: RunDirectory, plan: PrivacyPlan,
                    reporter: Reporter, checkpointer: Checkpointer,
                    runtime: dict[str, Any] | None, play: Play = play_round) -> None:
    """Wait for the clients, play the rounds with the standard listeners, finish the run."""
    config = run.config
    artifacts = FinalArtifacts(run_dir, plan, runtime)
    # SecAgg+ completes a round's rows before any other listener reads them
    listeners: list[RunListener] = []
    if config.strategy.secure_aggregation:  # build_strategy wrapped the strategy in SecAgg+
        listeners.append(SecAggRecorder(cast(SecAggPlus, run.strategy)))
    reference = [CentralizedReference(artifacts)] if config.run.reference else []
    # a caller's own callbacks ride on its reporter (fedtune.run's callbacks)
    user = [UserCallbacks(callbacks, run_dir, artifacts)] if (
        callbacks := list(getattr(reporter, "callbacks", ()))) else []
    # every client's own model, before its round's row is written (the runtime's state store)
    personal = [PersonalEvaluation(run_dir, artifacts, checkpointer.store)] if (
        personal_evaluation_on(config)) else []
    listeners += [
        NoUpdateStop(), PrivacyStop(), *personal, RoundWriter(run_dir),
        *([BestModel(run_dir)] if config.run.save_best else []), *reference, artifacts,
        AuditWriter(run_dir, plan),
        *([Tracking(chosen, run_dir)] if (chosen := trackers(config)) else []), *user,
        ProgressListener(reporter, run_dir, artifacts), checkpointer,
    ]
    for listener in listeners:
        listener.run_started(run)
    wait_for_nodes(run.grid, run.config.data.num_clients, run.config.engine.node_wait_s)
    run.started = time.perf_counter()
    final = run_rounds(run, listeners, play)
    for listener in listeners:
        listener.run_ended(run, final)


def make_server_app(reporter: Reporter | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that reads its config from the run config (Flower's or fedtune's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = from_run_config(context.run_config)
        for ignored in keys_without_effect(config):
            log(WARNING, "fedtune: %s", ignored.message())
        run_federated(grid, config, reporter, stop, runtime=SUPERLINK_RUNTIME)

    return server_app


app = make_server_app()
