"""What a finished run leaves: no lock file, every file readable as any other (the model
too), and clients.csv's examples_trained counting the examples the batches really held."""

from __future__ import annotations

import os
import stat

import pytest

from fedtune.config import ConfigError
from fedtune.engine.inprocess import run_inprocess
from fedtune.results.lock import LOCK_NAME, RunLock
from tests.conftest import rows_of, tiny_config


def test_a_finished_run_leaves_no_lock_and_files_anyone_may_read(tmp_path, one_torch_thread):
    """batch_size 500 is above every client's training split: one partial batch each."""
    config = tiny_config(tmp_path, "client.batch_size=500", "client.local_steps=1",
                         "run.rounds=1", "run.save_best=true")
    run_dir = run_inprocess(config).path
    assert not (run_dir / LOCK_NAME).exists()
    mode = stat.S_IMODE(os.stat(run_dir / "config.toml").st_mode)
    for name in ("model/model.safetensors", "model_best/model.safetensors", "summary.json"):
        assert stat.S_IMODE(os.stat(run_dir / name).st_mode) == mode, name
    clients = rows_of(run_dir / "clients.csv")
    assert len(clients) == 4
    for client in clients:  # one batch of the whole split, not local_steps x batch_size
        assert int(client["examples_trained"]) == int(client["num_examples"]) < 500


def test_the_lock_file_goes_with_its_holder_and_a_second_writer_is_refused(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match="is in use by process"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        assert (tmp_path / LOCK_NAME).is_file()
