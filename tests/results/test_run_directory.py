"""What a finished run leaves: no lock file, every file readable as any other (the model
too), and clients.csv's examples_trained counting the examples the batches really held."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest

from fedtune.config import ConfigError
from fedtune.engine.inprocess import run_inprocess
from fedtune.results.lock import LOCK_NAME, RunLock
from fedtune.results.run_dir import CLIENT_COLUMNS, ClientRow, RoundRow, RunDirectory
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


def test_clients_and_metrics_rows_are_written_cell_by_cell_as_before(tmp_path):
    """clients.csv's lines come from each row's fields without a dict per client: a float to
    6 significant digits (numpy's float64 too; a float32 as str() writes it), NaN and None
    empty, integers of any kind and bools as str() writes them, a reason one printable line
    (escape sequences and blank text dropped); metrics.csv the same."""
    run_dir = RunDirectory(tmp_path)
    clients = [
        ClientRow(3, 0, 12, 0.6958941, None, 0.000875189, "ok", "", 8),
        ClientRow(3, None, np.int64(5), math.nan, math.inf, np.float32(0.1), "rejected",
                  "bad\x1b[31m\nline", None, "evaluate", -0.0, 1e-300, 3),
        ClientRow(3, 7, True, np.float64(1 / 3), np.nan, 1e20, "failed", "  ", np.int32(2),
                  "train", 2.5, None, 0),
    ]
    row = RoundRow(3, 0.5, math.nan, None, 0.3, None, None, None, None, None, 10, 9, 1, 5, 6,
                   0.125, model_update="kept: a\nb")
    run_dir.append_round(row, clients)
    run_dir.append_round(row, clients[:1])
    lines = (tmp_path / "clients.csv").read_text(encoding="utf-8").splitlines()
    assert lines == [",".join(CLIENT_COLUMNS),
                     "3,0,12,0.695894,,0.000875189,ok,,8,train,,,",
                     "3,,5,,inf,0.1,rejected,bad line,,evaluate,-0,1e-300,3",
                     "3,7,True,0.333333,,1e+20,failed,,2,train,2.5,,0",
                     "3,0,12,0.695894,,0.000875189,ok,,8,train,,,"]
    metrics = (tmp_path / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert metrics[1].startswith("3,0.5,,,0.3,,,,,,10,9,1,5,6,0.125,,,kept: a b,0,")
    with pytest.raises(ValueError, match="not in fieldnames: \\['nope'\\]"):
        run_dir.append_personal([{"round": 1, "nope": 2}])
