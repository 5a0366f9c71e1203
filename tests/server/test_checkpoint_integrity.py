"""Checkpoints that were edited, damaged or are in use are refused with one line naming why;
they are written durably; local DP never resumes without its client accountants."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import save_file

from fedtune.cli import _print_stopped
from fedtune.config import ConfigError
from fedtune.engine.inprocess import run_inprocess
from fedtune.results.lock import RunLock
from fedtune.server.checkpoint import (
    CheckpointError,
    read_checkpoint,
    sha256_of,
    write_checkpoint,
)
from fedtune.server.resume import check_resumable, config_digest
from tests.conftest import REPO, tiny_config

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round run with a checkpoint after each round, kept pristine."""
    config = tiny_config(tmp_path_factory.mktemp("pristine"), "run.rounds=2")
    return run_inprocess(config).path


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _resume_config(run_dir: Path, *extra: str):
    config = tiny_config(run_dir.parent, "run.rounds=3", f"run.dir={run_dir}", *extra)
    config.run.resume = True
    return config


def _rewrite_manifest(run_dir: Path) -> None:
    """What someone who edits a checkpoint and recomputes its checksums does."""
    manifest_path = run_dir / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {name: sha256_of(run_dir / "checkpoint" / name)
                         for name in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "state.json").write_text(
        (c / "state.json").read_text().replace('"round": 2', '"round": 1')),
     "checkpoint/state.json does not match manifest.json: it was changed or damaged"),
    (lambda c: (c / "global.safetensors").write_bytes(
        (c / "global.safetensors").read_bytes()[:100]),
     "checkpoint/global.safetensors does not match manifest.json"),
    (lambda c: (c / "rng.safetensors").unlink(), "checkpoint/rng.safetensors is missing"),
    (lambda c: (c / "manifest.json").unlink(),
     "checkpoint/manifest.json is missing: the checkpoint cannot be verified"),
    (lambda c: (c / "manifest.json").write_text("{not json"),
     "checkpoint/manifest.json cannot be read"),
])
def test_an_edited_or_damaged_checkpoint_is_refused_naming_the_file(run_copy, damage, message):
    damage(run_copy / "checkpoint")
    with pytest.raises(CheckpointError, match=message):
        run_inprocess(_resume_config(run_copy))
    assert len((run_copy / "metrics.csv").read_text().splitlines()) == 3  # nothing lost


def test_an_edited_config_is_refused(run_copy):
    toml = run_copy / "config.toml"
    toml.write_text(toml.read_text().replace("lr = 0.01", "lr = 0.5"))
    with pytest.raises(CheckpointError, match="config.toml does not match the checkpoint's "
                                              "checkpoint/manifest.json: the config was edited"):
        check_resumable(_resume_config(run_copy, "client.lr=0.5"))
    # what a resume may change (run.rounds) leaves the digest alone
    assert config_digest(_resume_config(run_copy)) == config_digest(
        _resume_config(run_copy, "run.rounds=9"))


def test_checksummed_but_unusable_checkpoints_are_one_line_errors(run_copy):
    checkpoint = run_copy / "checkpoint"
    weights = read_checkpoint(run_copy).global_arrays
    save_file({name: np.full_like(value, np.nan) for name, value in weights.items()},
              str(checkpoint / "global.safetensors"), metadata={"order": json.dumps(list(weights))})
    _rewrite_manifest(run_copy)
    with pytest.raises(CheckpointError, match="global.safetensors holds non-finite weights"):
        run_inprocess(_resume_config(run_copy))
    (checkpoint / "state.json").write_text("[]")
    _rewrite_manifest(run_copy)
    with pytest.raises(CheckpointError, match="state.json does not hold a JSON object"):
        run_inprocess(_resume_config(run_copy))
    (checkpoint / "state.json").write_text('{"round": 2}')
    _rewrite_manifest(run_copy)
    with pytest.raises(CheckpointError, match=r"state.json cannot be read \(KeyError"):
        read_checkpoint(run_copy)


def test_cli_reports_a_damaged_checkpoint_in_one_line(run_copy):
    (run_copy / "checkpoint" / "strategy.safetensors").write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "fedtune", "run", "--resume", str(run_copy),
                             "--set", "run.rounds=3"], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"fedtune: error: checkpoint file {run_copy}/checkpoint/strategy.safetensors does not "
        "match manifest.json: it was changed or damaged after the checkpoint was written")


def test_a_second_writer_is_refused_with_the_holders_pid(run_copy):
    with RunLock(run_copy):
        with pytest.raises(ConfigError, match=f"run directory {run_copy} is in use by process "
                                              f"{os.getpid()}"):
            run_inprocess(_resume_config(run_copy))
        result = subprocess.run([sys.executable, "-m", "fedtune", "run", "--resume",
                                 str(run_copy), "--set", "run.rounds=3"], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"fedtune: error: run directory {run_copy} is in use "
                                         f"by process {os.getpid()} (another fedtune run writes "
                                         "it): wait for it to end, or stop it")
    resumed = run_inprocess(_resume_config(run_copy)).path  # free again: the run goes on
    rounds = [line.split(",")[0] for line in (resumed / "metrics.csv").read_text().splitlines()]
    assert rounds == ["round", "1", "2", "3"]  # each round once


def test_checkpoint_files_and_directory_are_synced_before_the_swap(run_copy, monkeypatch):
    events: list[str] = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "sync " + os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(
        f"rename {self.name} -> {Path(target).name}"), real_rename(self, target))[1])
    write_checkpoint(run_copy, read_checkpoint(run_copy), "digest")
    partial = str(run_copy / "checkpoint.partial")
    swap = events.index("rename checkpoint.partial -> checkpoint")
    synced = {event.removeprefix("sync ") for event in events[:swap] if event.startswith("sync")}
    assert synced >= {f"{partial}/{name}" for name in (
        "global.safetensors", "strategy.safetensors", "rng.safetensors", "client_states.safetensors",
        "state.json", "manifest.json")} | {partial}
    assert events[swap + 1] == f"sync {run_copy}"  # the renames themselves are durable
    assert json.loads((run_copy / "checkpoint" / "manifest.json").read_text())["config"] == \
        "digest"


def test_the_stop_line_names_a_checkpoint_only_when_there_is_one(run_copy, tmp_path):
    def printed(run_dir: Path) -> str:
        console = Console(file=io.StringIO(), width=300)
        _print_stopped(console, run_dir, "normal")
        return console.file.getvalue()

    empty = tmp_path / "fresh"
    empty.mkdir()
    assert printed(empty).strip() == ("stopped before round 1 finished: no checkpoint was "
                                      "written, there is nothing to resume")
    assert printed(run_copy).strip() == (f"stopped: checkpoint of round 2 in {run_copy}/"
                                         f"checkpoint; continue with: fedtune run --resume "
                                         f"{run_copy}")


LOCAL_DP = ["privacy.mode=local", "privacy.noise_multiplier=0.8", "privacy.delta=1e-3"]


def test_local_dp_never_resumes_without_the_client_accountants(tmp_path):
    run_dir = run_inprocess(tiny_config(tmp_path, "run.rounds=2", *LOCAL_DP)).path
    config = tiny_config(tmp_path, "run.rounds=3", f"run.dir={run_dir}", *LOCAL_DP,
                         "engine.backend=flower")
    config.run.resume = True
    with pytest.raises(ConfigError, match="engine.backend = 'flower' is not allowed to resume "
                                          "privacy.mode = 'local': it cannot give the clients "
                                          "back their privacy accountants"):
        check_resumable(config)
    # a checkpoint made under engine.backend = flower holds no client states
    checkpoint = read_checkpoint(run_dir)
    checkpoint.client_states = None
    write_checkpoint(run_dir, checkpoint, config_digest(config))
    config.engine.backend = "inprocess"
    with pytest.raises(ConfigError, match="privacy.mode = 'local' is not allowed to resume this "
                                          "checkpoint: it holds no client states"):
        run_inprocess(config)


def test_an_asynchronous_checkpoint_of_another_event_loop_is_refused(tmp_path):
    """A FedBuff checkpoint whose event loop kept other attributes (as the loop before the
    table of clients in flight did) would resume with nobody in flight: refused in one line."""
    fedbuff = ["strategy.name=fedbuff", "devices.profile=lognormal",
               "strategy.fedbuff_buffer_size=2", "strategy.concurrency=3"]
    run_dir = run_inprocess(tiny_config(tmp_path, *fedbuff)).path
    state = run_dir / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    loop = meta["strategy"]["async_loop"]["obj"]
    loop["in_flight"] = loop.pop("flight")  # what another layout of the loop wrote
    state.write_text(json.dumps(meta))
    _rewrite_manifest(run_dir)
    config = tiny_config(tmp_path, *fedbuff, "run.rounds=3", f"run.dir={run_dir}")
    config.run.resume = True
    with pytest.raises(CheckpointError, match="asynchronous event loop was written by another "
                                              r"version of fedtune \(its state differs in "
                                              "flight, in_flight\\); it cannot resume"):
        run_inprocess(config)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3  # nothing lost
