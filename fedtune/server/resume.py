"""Checkpointing a run as its rounds end, and continuing a run from its checkpoint.

``Checkpointer`` is the round loop's listener for checkpoints: after every round it captures the
state in memory (strategy and privacy attributes, RNGs, a snapshot of the runtime's client state
store: digests, no copy of the states), and writes it to disk every ``run.checkpoint_every``
rounds and whenever the run ends early (Ctrl-C, a failure). ``check_resumable`` checks that a
resume continues the same run - the checkpoint matches its manifest, config.toml is the config
it was written under, the settings agree, and a privacy mode that keeps its accountants in the
clients' state finds them - and ``resume_state`` puts everything back. The format is in
``fedtune.server.checkpoint``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.config import (
    RESUME_MAY_CHANGE,
    Config,
    ConfigError,
    check_same_run,
    load_config,
    to_dict,
)
from fedtune.protocol import to_array_record
from fedtune.results.run_dir import RunDirectory
from fedtune.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_attributes,
    capture_rng,
    find_checkpoint,
    read_checkpoint,
    restore_attributes,
    restore_rng,
    verify_checkpoint,
    write_checkpoint,
)
from fedtune.server.grid import SimulatedGrid
from fedtune.server.loop import RunListener
from fedtune.server.node_state import new_run_key
from fedtune.server.round import FederatedRun, RoundOutcome
from fedtune.server.state import RoundState
from fedtune.state.blobs import STATE_DIR
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES


def config_digest(config: Config) -> str:
    """SHA-256 of the config without the keys a resume may change: what a checkpoint's
    manifest records, so that an edited config.toml is noticed."""
    kept = copy.deepcopy(to_dict(config))
    for section, keys in RESUME_MAY_CHANGE.items():
        kept[section] = {} if keys is None else {
            key: value for key, value in kept[section].items() if key not in keys}
    return hashlib.sha256(tomli_w.dumps(kept).encode("utf-8")).hexdigest()


def _refuse_another_event_loop(stateful: Any, description: dict[str, Any],
                               arrays: Mapping[str, np.ndarray]) -> None:
    """An asynchronous run's checkpoint keeps its event loop's attributes
    (``fedtune.server.async_loop.AsyncLoop``); one written by a fedtune whose loop kept other
    ones (before 0d05609: seven arrays instead of the table of clients in flight) or tables of
    other columns (before the start number joined the table of clients in flight) would be
    restored into a loop that misreads them: CheckpointError."""
    loop = getattr(stateful, "async_loop", None)
    saved = description.get("async_loop", {}).get("obj")
    if loop is None or saved is None:
        return
    current = vars(loop)
    other = sorted(set(saved) ^ set(current)) or sorted(
        name for name, node in saved.items()
        if "a" in node and isinstance(current[name], np.ndarray)
        and arrays[node["a"]].shape[1:] != current[name].shape[1:])
    if not other:
        return
    raise CheckpointError(
        "this checkpoint's asynchronous event loop was written by another version of fedtune "
        f"(its state differs in {', '.join(other)}); it cannot resume: start the run again, "
        "or resume it with the fedtune that wrote it")


class Checkpointer(RunListener):
    """Keeps the latest round's state in memory; writes it as configured or when asked."""

    def __init__(self, run_path: Path, config: Config, grid: Grid, stateful: Any) -> None:
        """``stateful``: an object whose attributes are the server objects to keep (the
        strategy, the privacy mode's server state)."""
        self.run_path = run_path
        self.config_digest = config_digest(config)
        self.every = config.run.checkpoint_every
        self.backend = config.engine.backend
        self.stateful = stateful
        # the runtime's client state store (None: the runtime keeps its clients' state itself)
        self.store = grid.client_states if isinstance(grid, SimulatedGrid) else None
        if self.store is not None:
            self.store.open(run_path / STATE_DIR)
        self.latest: Checkpoint | None = None
        self.written_round = -1

    def restore(self, checkpoint: Checkpoint) -> None:
        """Put strategy, privacy state, RNGs and client states back as ``checkpoint`` recorded
        them."""
        _refuse_another_event_loop(self.stateful, *checkpoint.strategy)
        restore_attributes(self.stateful, *checkpoint.strategy)
        restore_rng(*checkpoint.rng)
        saved_states = checkpoint.client_states
        if saved_states is not None and saved_states.digests and self.store is None:
            raise ConfigError(
                f"engine.backend = {self.backend!r} is not allowed to resume this checkpoint: "
                f"its runtime cannot restore the {len(saved_states.digests)} client states it "
                "holds; must be one of ray, inprocess"
            )
        if saved_states is not None and self.store is not None:
            self.store.restore(saved_states)
        elif self.store is not None:
            log(WARNING, "fedtune: the checkpoint has no client states (its runtime keeps them "
                         "private); clients resume with empty state")
        self.latest = checkpoint
        self.written_round = checkpoint.server_round

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        """Capture the state after ``run.state.server_round``; write it if it is due."""
        state = run.state
        self.latest = Checkpoint(
            server_round=state.server_round,
            global_arrays={name: array.numpy() for name, array in state.arrays.items()},
            strategy=capture_attributes(self.stateful),
            rng=capture_rng(),
            client_states=None if self.store is None else self.store.snapshot(),
            counters={"rounds_without_update": state.rounds_without_update,
                      "elapsed_s": state.elapsed_s + time.perf_counter() - run.started,
                      "node_to_client": {str(k): v for k, v in state.node_to_client.items()},
                      "stop_reason": state.stop_reason, "run_key": state.run_key,
                      "virtual_time_s": state.virtual_time_s},
        )
        if self.every and state.server_round % self.every == 0:
            written = self.save_latest()
            if written is not None:
                run.announce_saved("checkpoint", written)

    def run_aborted(self, run: FederatedRun, error: BaseException) -> None:
        self.save_latest()

    def save_latest(self) -> Path | None:
        """Write the latest captured state unless it is on disk already."""
        if self.latest is None or self.latest.server_round == self.written_round:
            return None
        path = write_checkpoint(self.run_path, self.latest, self.config_digest)
        self.written_round = self.latest.server_round
        if self.store is not None and self.latest.client_states is not None:
            self.store.checkpointed(self.latest.client_states)
        return path


def check_resumable(config: Config) -> Checkpoint:
    """The checkpoint in ``run.dir``, once it is sure to continue this run: it matches its
    manifest and holds finite weights, config.toml is the config it was written under,
    ``config`` is the checkpointed run's own up to RESUME_MAY_CHANGE, and client accountants
    come back with it."""
    run_path = Path(config.run.dir)
    directory = find_checkpoint(run_path)
    if directory is None:
        raise ConfigError(f"run.dir = {config.run.dir!r} is not allowed with run.resume = true: "
                          "it has no checkpoint (written every run.checkpoint_every rounds and "
                          "on Ctrl-C)")
    manifest = verify_checkpoint(directory)
    saved_config = load_config(run_path / "config.toml", resolved=True)
    if config_digest(saved_config) != manifest.get("config"):
        raise CheckpointError(f"{run_path / 'config.toml'} does not match the checkpoint's "
                              f"{directory.name}/manifest.json: the config was edited after the "
                              "checkpoint was written")
    check_same_run(saved_config, config)
    checkpoint = read_checkpoint(run_path)
    _check_client_accountants(config, checkpoint)
    if config.run.rounds < checkpoint.server_round:
        raise ConfigError(
            f"run.rounds = {config.run.rounds} is not allowed when resuming: must be >= "
            f"{checkpoint.server_round}, the round the checkpoint was written after"
        )
    bad = [name for name, value in checkpoint.global_arrays.items()
           if value.dtype.kind in "fc" and not np.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"checkpoint file {directory / 'global.safetensors'} holds "
                              f"non-finite weights ({', '.join(bad[:3])})")
    return checkpoint


def _check_client_accountants(config: Config, checkpoint: Checkpoint) -> None:
    """A privacy mode whose ε lives in each client's state cannot go on without those
    states: every client's ε would restart at 0 and the guarantee would be void."""
    if not PRIVACY_MODES[config.privacy.mode].client_accountants:
        return
    if checkpoint.client_states is None:
        raise ConfigError(
            f"privacy.mode = {config.privacy.mode!r} is not allowed to resume this checkpoint: "
            "it holds no client states (its runtime, engine.backend = 'flower', keeps them "
            "private), so every client's privacy accountant would restart at ε = 0"
        )
    if not RUNTIMES[config.engine.backend].client_states:
        allowed = ", ".join(repr(name) for name, entry in RUNTIMES.items() if entry.client_states)
        raise ConfigError(
            f"engine.backend = {config.engine.backend!r} is not allowed to resume privacy.mode "
            f"= {config.privacy.mode!r}: it cannot give the clients back their privacy "
            f"accountants; must be one of {allowed}"
        )


def resume_state(config: Config, grid: Grid, stateful: Any
                 ) -> tuple[RunDirectory, RoundState, Checkpointer]:
    """The run directory ``run.dir``, the round state its checkpoint saved, and a checkpointer
    that has put back the strategy, privacy state, RNGs and client states."""
    run_dir = RunDirectory.open(config)
    checkpoint = check_resumable(config)
    run_dir.truncate_after(checkpoint.server_round)
    run_dir.write_config(config)  # run.rounds may have grown
    counters = checkpoint.counters
    try:
        state = RoundState(
            to_array_record(checkpoint.global_arrays), checkpoint.server_round,
            int(counters["rounds_without_update"]), float(counters["elapsed_s"]),
            {int(node): int(client) for node, client in counters["node_to_client"].items()},
            str(counters["stop_reason"]),
            # a checkpoint from before run keys: its SuperNodes kept no state to find again
            str(counters.get("run_key") or new_run_key()),
            float(counters.get("virtual_time_s", 0.0)),
        )
        checkpointer = Checkpointer(run_dir.path, config, grid, stateful)
        checkpointer.restore(checkpoint)
    except ConfigError:  # says itself what is wrong (a missing client state file ...)
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint in {run_dir.path} does not fit this run's "
                              f"strategy or state ({type(error).__name__}: {error})") from None
    log(INFO, "fedtune: resuming %s after round %d", run_dir.path, checkpoint.server_round)
    return run_dir, state, checkpointer
