"""Whole runs: the results contract on disk, FedAvg's aggregate, determinism, both runtimes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedtune.client.app import app as client_app
from fedtune.config import from_dict, to_run_config
from fedtune.data.loaders import eval_loader
from fedtune.engine.inprocess import InProcessGrid, run_inprocess
from fedtune.models.build import load_saved_model
from fedtune.results.run_dir import CLIENT_COLUMNS, METRICS_COLUMNS
from fedtune.server.app import run_federated
from fedtune.task import task_resources
from fedtune.train import evaluate
from tests.conftest import MLP_DIGITS, tiny_config

CONTRACT = ["config.toml", "env.json", "metrics.csv", "clients.csv", "summary.json",
            "partitions.csv", "model/model.safetensors", "model/fedtune_model.json",
            "plots/accuracy_loss.png", "plots/partitions.png"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_contract(run_dir: Path, rounds: int, clients: int, num_clients: int | None = None) -> None:
    """Every file of the results contract exists and holds sane values.

    ``clients`` is how many clients train each round, ``num_clients`` how many exist.
    """
    num_clients = num_clients or clients
    for name in CONTRACT:
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "plots/accuracy_loss.png").read_bytes()[:4] == b"\x89PNG"
    config = from_dict(tomllib.loads((run_dir / "config.toml").read_text()))
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == config.run.seed and env["packages"]["flwr"].startswith("1.41")
    metrics = _rows(run_dir / "metrics.csv")
    assert list(metrics[0]) == METRICS_COLUMNS
    assert [int(r["round"]) for r in metrics] == list(range(1, rounds + 1))
    for row in metrics:
        assert 0 <= float(row["eval_accuracy"]) <= 1
        assert 0 <= float(row["eval_macro_f1"]) <= 1
        assert float(row["train_loss"]) > 0 and float(row["eval_loss"]) > 0
        assert int(row["clients_ok"]) == int(row["clients_sampled"]) == clients
        assert int(row["bytes_up"]) > 0 and int(row["bytes_down"]) >= int(row["bytes_up"])
        assert float(row["wall_s"]) > 0
    client_rows = _rows(run_dir / "clients.csv")
    assert list(client_rows[0]) == CLIENT_COLUMNS
    assert len(client_rows) == rounds * clients
    assert {r["status"] for r in client_rows} == {"ok"}
    seen = {int(r["client_id"]) for r in client_rows}
    assert seen <= set(range(num_clients))
    if clients == num_clients:
        assert seen == set(range(num_clients))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    assert summary["final"]["eval_accuracy"] == pytest.approx(float(metrics[-1]["eval_accuracy"]))
    assert set(summary["classification_report"]) >= set(summary["dataset"]["labels"])
    assert summary["total_bytes_up"] == sum(int(r["bytes_up"]) for r in metrics)


def test_inprocess_run_writes_the_whole_contract(mlp_config):
    run_dir = run_inprocess(mlp_config).path
    check_contract(run_dir, rounds=2, clients=4)
    # the saved model reproduces the final global test accuracy
    model, spec = load_saved_model(run_dir / "model")
    resources = task_resources(mlp_config)
    result = evaluate(model, eval_loader(resources.encoded, resources.federation.data.labels,
                                         resources.federation.test_rows, 256),
                      torch.device("cpu"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.accuracy == pytest.approx(summary["final"]["eval_accuracy"], rel=1e-5)
    assert summary["final"]["eval_accuracy"] > 0.5  # digits, 10 classes: chance is 0.1


class RecordingGrid(InProcessGrid):
    """The in-process grid sending every message through the ClientApp (no cohort path), keeping
    a copy of every training reply the server received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs_cohorts = False
        self.train_replies = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.train_replies += [r for r in replies
                               if not r.has_error() and r.content.array_records]
        return replies


def test_fedavg_global_model_is_the_example_weighted_mean(tmp_path):
    config = tiny_config(tmp_path, "run.rounds=1", "data.partitioner=quantity_skew",
                         "data.quantity_alpha=0.5")
    grid = RecordingGrid(client_app, to_run_config(config), config.data.num_clients)
    run_dir = run_federated(grid, config).path
    replies = grid.train_replies
    assert len(replies) == 4
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=float)
    assert len(set(weights)) > 1  # quantity skew: unequal clients, so weighting matters
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    for name, value in saved.items():
        stacked = np.stack([r.content["arrays"][name].numpy() for r in replies])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        unweighted = stacked.mean(axis=0)
        if name.endswith("weight"):
            assert not np.allclose(value, unweighted, rtol=1e-6, atol=1e-7)


def _without_timing(rows, timing_column):
    return [{k: v for k, v in r.items() if k != timing_column} for r in rows]


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    first = run_inprocess(tiny_config(tmp_path, "run.dir=" + str(tmp_path / "a"))).path
    second = run_inprocess(tiny_config(tmp_path, "run.dir=" + str(tmp_path / "b"))).path
    other = run_inprocess(tiny_config(tmp_path, "run.dir=" + str(tmp_path / "c"),
                                      "run.seed=1")).path
    # every column but the wall-clock ones (wall_s, duration_s) must match exactly
    a, b = _rows(first / "metrics.csv"), _rows(second / "metrics.csv")
    assert _without_timing(a, "wall_s") == _without_timing(b, "wall_s")
    assert (_without_timing(_rows(first / "clients.csv"), "duration_s")
            == _without_timing(_rows(second / "clients.csv"), "duration_s"))
    assert (first / "model/model.safetensors").read_bytes() == (
        second / "model/model.safetensors").read_bytes()
    c = _rows(other / "metrics.csv")
    assert _without_timing(a, "wall_s") != _without_timing(c, "wall_s")


def test_text_run_with_a_hugging_face_model(tmp_path, tiny_bert_path):
    config = tiny_config(tmp_path, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=300", "data.num_clients=3",
        "data.partitioner=natural", f"model.path={tiny_bert_path}", "model.max_length=32",
        "run.rounds=2", "client.local_steps=2", "engine.backend=inprocess",
        "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
    ])
    run_dir = run_inprocess(config).path
    check_contract(run_dir, rounds=2, clients=3)
    assert (run_dir / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_all_runtimes_reach_the_same_global_model(tmp_path, monkeypatch):
    """Same seed, same config: fedtune's Ray engine (two actors doing every phase; one actor,
    whose small phases after the first run in the driver) and the in-process grid reach the
    same final global weights bit for bit, Flower's simulation runtime the same weights to
    float32 rounding."""
    from fedtune.engine import ray_grid
    from fedtune.engine.flower_sim import run_flower_simulation
    from fedtune.engine.ray_engine import run_ray_engine

    flower_config = tiny_config(tmp_path, "engine.backend=flower",
                                "run.dir=" + str(tmp_path / "flower"))
    run_flower_simulation(flower_config)
    check_contract(tmp_path / "flower", rounds=2, clients=4)
    for name, extra, phase_s in (("ray", ["engine.num_actors=2"], 0.0),
                                 ("ray-one-actor", ["engine.num_actors=1"], ray_grid.RAY_PHASE_S)):
        monkeypatch.setattr(ray_grid, "RAY_PHASE_S", phase_s)
        run_ray_engine(tiny_config(tmp_path, "engine.backend=ray", *extra,
                                   "run.dir=" + str(tmp_path / name)))
        check_contract(tmp_path / name, rounds=2, clients=4)
    local = run_inprocess(tiny_config(tmp_path, "run.dir=" + str(tmp_path / "l"))).path
    local_model = load_file(str(local / "model/model.safetensors"))
    for runtime in ("ray", "ray-one-actor"):  # the same blocks, summed in the same order
        model = load_file(str(tmp_path / runtime / "model/model.safetensors"))
        assert set(model) == set(local_model)
        for name, value in local_model.items():
            assert np.array_equal(model[name], value), f"{runtime}: {name}"
    # Flower's runtime sums FedAvg's replies in float32: the same model to rounding
    model = load_file(str(tmp_path / "flower" / "model/model.safetensors"))
    for name, value in local_model.items():
        np.testing.assert_allclose(model[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"flower: {name}")


def test_cli_run_and_report(tmp_path):
    out = tmp_path / "cli-run"
    args = [sys.executable, "-m", "fedtune", "run", "--output", str(out)]
    for override in MLP_DIGITS:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"run directory: {out}"
    check_contract(out, rounds=2, clients=4)
    (out / "plots" / "accuracy_loss.png").unlink()
    report = subprocess.run([sys.executable, "-m", "fedtune", "report", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (out / "plots" / "accuracy_loss.png").is_file()
    assert "final global test accuracy" in report.stdout
