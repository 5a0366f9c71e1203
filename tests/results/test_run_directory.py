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


def test_the_summary_takes_the_final_models_evaluation_when_its_row_has_none():
    """An asynchronous run with strategy.eval_every > 1 that stopped between evaluations: its
    last metrics.csv row has empty test columns; summary.json's final reads the evaluation the
    run made of its final model instead, and a row with its own evaluation keeps it."""
    from fedtune.results.summary import final_tested
    from fedtune.train import EvalResult

    kept = EvalResult(loss=0.5, accuracy=0.75, macro_f1=0.7, num_examples=8)
    between = {"round": "3", "eval_accuracy": "", "eval_macro_f1": "", "eval_loss": ""}
    assert final_tested(between, kept) == {"eval_accuracy": 0.75, "eval_macro_f1": 0.7,
                                           "eval_loss": 0.5}
    evaluated = {"round": "4", "eval_accuracy": "0.8", "eval_macro_f1": "0.6", "eval_loss": "0.4"}
    assert final_tested(evaluated, kept) == {"eval_accuracy": 0.8, "eval_macro_f1": 0.6,
                                             "eval_loss": 0.4}
    assert final_tested(between, None)["eval_accuracy"] is None  # a chosen round's own row
