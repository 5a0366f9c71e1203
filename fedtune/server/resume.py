"""Checkpointing a run as its rounds end, and continuing a run from its checkpoint.

``Checkpointer`` is the round loop's listener for checkpoints: after every round it captures the
state in memory (strategy and privacy attributes, RNGs, the client states that changed), and
writes it to disk every ``run.checkpoint_every`` rounds and whenever the run ends early
(Ctrl-C, a failure). ``check_resumable`` checks that a resume continues the same run, and
``resume_state`` puts everything back. The format is in ``fedtune.server.checkpoint``.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from flwr.serverapp import Grid

from fedtune.config import Config, ConfigError, load_config, to_dict
from fedtune.protocol import to_array_record
from fedtune.results.run_dir import RunDirectory
from fedtune.server.checkpoint import (
    Checkpoint,
    capture_attributes,
    capture_rng,
    checkpoint_round,
    read_checkpoint,
    restore_attributes,
    restore_rng,
    write_checkpoint,
)
from fedtune.server.grid import SimulatedGrid
from fedtune.server.loop import RunListener
from fedtune.server.round import FederatedRun, RoundOutcome
from fedtune.server.state import RoundState

# keys a resume may change: where and how long the run goes on, and on which runtime
RESUME_MAY_CHANGE = {"run": {"dir", "output_dir", "rounds", "checkpoint_every", "resume"},
                     "engine": None, "tracking": None}  # None: every key of the section


class Checkpointer(RunListener):
    """Keeps the latest round's state in memory; writes it as configured or when asked."""

    def __init__(self, run_path: Path, config: Config, grid: Grid, stateful: Any) -> None:
        """``stateful``: an object whose attributes are the server objects to keep (the
        strategy, the privacy mode's server state)."""
        self.run_path = run_path
        self.every = config.run.checkpoint_every
        self.backend = config.engine.backend
        self.stateful = stateful
        self.grid = grid
        self.client_states: dict[int, bytes] | None = (
            {} if isinstance(grid, SimulatedGrid) else None)
        self.latest: Checkpoint | None = None
        self.written_round = -1

    def restore(self, checkpoint: Checkpoint) -> None:
        """Put strategy, privacy state, RNGs and client states back as ``checkpoint`` recorded
        them."""
        restore_attributes(self.stateful, *checkpoint.strategy)
        restore_rng(*checkpoint.rng)
        saved_states = checkpoint.client_states
        if saved_states and self.client_states is None:
            raise ConfigError(
                f"engine.backend = {self.backend!r} is not allowed to resume this checkpoint: "
                f"its runtime cannot restore the {len(saved_states)} client states it holds; "
                "must be one of ray, inprocess"
            )
        if saved_states is not None and isinstance(self.grid, SimulatedGrid):
            self.grid.restore_client_states(saved_states)
            self.client_states = dict(saved_states)
        elif self.client_states is not None:
            log(WARNING, "fedtune: the checkpoint has no client states (its runtime keeps them "
                         "private); clients resume with empty state")
        self.latest = checkpoint
        self.written_round = checkpoint.server_round

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        """Capture the state after ``run.state.server_round``; write it if it is due."""
        state = run.state
        if isinstance(self.grid, SimulatedGrid) and self.client_states is not None:
            self.client_states.update(self.grid.changed_client_states())
        self.latest = Checkpoint(
            server_round=state.server_round,
            global_arrays={name: array.numpy() for name, array in state.arrays.items()},
            strategy=capture_attributes(self.stateful),
            rng=capture_rng(),
            client_states=None if self.client_states is None else dict(self.client_states),
            counters={"rounds_without_update": state.rounds_without_update,
                      "elapsed_s": state.elapsed_s + time.perf_counter() - run.started,
                      "node_to_client": {str(k): v for k, v in state.node_to_client.items()},
                      "stop_reason": state.stop_reason},
        )
        if self.every and state.server_round % self.every == 0:
            self.save_latest()

    def run_aborted(self, run: FederatedRun, error: BaseException) -> None:
        self.save_latest()

    def save_latest(self) -> Path | None:
        """Write the latest captured state unless it is on disk already."""
        if self.latest is None or self.latest.server_round == self.written_round:
            return None
        path = write_checkpoint(self.run_path, self.latest)
        self.written_round = self.latest.server_round
        return path


def check_resumable(config: Config) -> int:
    """The round the checkpoint in ``run.dir`` was written after; ``config`` must be the
    checkpointed run's own, up to RESUME_MAY_CHANGE."""
    server_round = checkpoint_round(Path(config.run.dir))
    if server_round is None:
        raise ConfigError(f"run.dir = {config.run.dir!r} is not allowed with run.resume = true: "
                          "it has no checkpoint (written every run.checkpoint_every rounds and "
                          "on Ctrl-C)")
    saved = to_dict(load_config(Path(config.run.dir) / "config.toml", resolved=True))
    current = to_dict(config)
    for section, values in current.items():
        free = RESUME_MAY_CHANGE.get(section, set())
        for key, value in values.items():
            if free is None or key in free or saved[section][key] == value:
                continue
            raise ConfigError(
                f"{section}.{key} = {value!r} is not allowed when resuming: must be "
                f"{saved[section][key]!r} as in {config.run.dir}/config.toml (only run.rounds, "
                "run.checkpoint_every, engine.* and tracking.* may change)"
            )
    if config.run.rounds < server_round:
        raise ConfigError(
            f"run.rounds = {config.run.rounds} is not allowed when resuming: must be >= "
            f"{server_round}, the round the checkpoint was written after"
        )
    return server_round


def resume_state(config: Config, grid: Grid, stateful: Any
                 ) -> tuple[RunDirectory, RoundState, Checkpointer]:
    """The run directory ``run.dir``, the round state its checkpoint saved, and a checkpointer
    that has put back the strategy, privacy state, RNGs and client states."""
    run_dir = RunDirectory.open(config)
    check_resumable(config)
    checkpoint = read_checkpoint(run_dir.path)
    run_dir.truncate_after(checkpoint.server_round)
    run_dir.write_config(config)  # run.rounds may have grown
    counters = checkpoint.counters
    state = RoundState(
        to_array_record(checkpoint.global_arrays), checkpoint.server_round,
        int(counters["rounds_without_update"]), float(counters["elapsed_s"]),
        {int(node): client for node, client in counters["node_to_client"].items()},
        counters["stop_reason"],
    )
    checkpointer = Checkpointer(run_dir.path, config, grid, stateful)
    checkpointer.restore(checkpoint)
    log(INFO, "fedtune: resuming %s after round %d", run_dir.path, checkpoint.server_round)
    return run_dir, state, checkpointer
