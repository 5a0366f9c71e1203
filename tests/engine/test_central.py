"""The centralized reference: its examples budget, convergence, the run directory it writes, the
federated run's ``run.reference`` and the config rules around it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.centralized import client_examples_per_round, examples_per_round
from fedtune.config import ConfigError, centralized_config, load_config
from fedtune.data.loaders import train_loader
from fedtune.engine.launch import launch
from fedtune.models.build import build_model, load_saved_model
from fedtune.task import task_resources
from fedtune.train import TrainSettings, evaluate, local_batches
from tests.conftest import MLP_DIGITS, rows_of, tiny_config


@pytest.mark.parametrize("size,batch,steps,epochs", [
    (10, 4, 5, 1), (10, 4, 3, 1), (3, 16, 2, 1), (40, 8, 2, 1), (10, 4, 0, 2), (7, 3, 7, 1)])
def test_client_examples_per_round_is_what_the_loader_yields(size, batch, steps, epochs):
    """The budget counts what a client's loop really sees: batches capped at the client's
    size, an epoch's last batch partial, local_steps cycling through epochs."""
    encoded = task_resources(load_config(None, MLP_DIGITS)).encoded
    labels = np.zeros(size + 1, dtype=np.int64)
    loader = train_loader(encoded, labels, np.arange(size), batch, seed=3)
    settings = TrainSettings(local_steps=steps, local_epochs=epochs)
    seen = sum(len(batch_labels) for _, batch_labels in local_batches(loader, settings))
    assert client_examples_per_round(size, batch, steps, epochs) == seen


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _global_accuracy(config, model_dir: Path) -> float:
    model, _ = load_saved_model(model_dir)
    resources = task_resources(config)
    return evaluate(model, resources.global_test_loader(), torch.device("cpu")).accuracy


def test_central_run_trains_the_federated_examples_and_writes_the_run_directory(tmp_path):
    config = tiny_config(tmp_path, "engine.backend=central", "strategy.fraction_train=0.5",
                         "run.rounds=3", "client.batch_size=8", "client.local_steps=3")
    run_dir = launch(config).path
    resources = task_resources(config)
    sizes = [len(rows) for rows in resources.federation.client_train_rows]
    # 2 of 4 clients per round, each 3 full batches of 8 (every client has more than 24)
    assert min(sizes) > 24 and examples_per_round(config, sizes) == 2 * 3 * 8
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["runtime"]["backend"] == "central"
    assert summary["centralized"]["examples_seen"] == 3 * 48  # whole batches of 8 add up
    assert summary["centralized"]["pooled_train_examples"] == sum(sizes)
    rows = rows_of(run_dir / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all(r["bytes_up"] == "0" and r["clients_sampled"] == "0" for r in rows)
    assert summary["final"]["eval_accuracy"] == pytest.approx(float(rows[-1]["eval_accuracy"]))
    # the saved model is the one evaluated
    assert _global_accuracy(config, run_dir / "model") == pytest.approx(
        summary["final"]["eval_accuracy"], abs=1e-6)
    assert (run_dir / "plots" / "accuracy_loss.png").is_file()


def test_central_run_starts_from_the_federated_initial_model(tmp_path):
    """With a vanishing learning rate the saved model is the initial one, which is the one
    ``fedtune.server.app.new_run`` builds for the federation."""
    config = tiny_config(tmp_path, "engine.backend=central", "client.optimizer=sgd",
                         "client.lr=1e-12", "run.rounds=1")
    run_dir = launch(config).path
    saved, _ = load_saved_model(run_dir / "model")
    initial = build_model(task_resources(config).spec, config.run.seed)
    for (name, value), (_, expected) in zip(saved.state_dict().items(),
                                            initial.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, atol=1e-9, rtol=0, msg=name)


def test_converged_keeps_the_epoch_with_the_lowest_validation_loss(tmp_path):
    config = tiny_config(tmp_path, "engine.backend=central", "engine.central_until=converged",
                         "engine.central_patience=2", "engine.central_max_epochs=12",
                         "client.lr=0.05")
    run_dir = launch(config).path
    rows = rows_of(run_dir / "metrics.csv")
    losses = [float(r["federated_eval_loss"]) for r in rows]
    best = int(np.argmin(losses)) + 1
    summary = _summary(run_dir)
    assert summary["centralized"]["best_epoch"] == best
    assert len(rows) == 12 or len(rows) == best + 2  # patience 2, or the cap
    assert summary["stop_reason"].startswith("converged" if len(rows) < 12
                                             else "engine.central_max_epochs")
    assert summary["final"]["round"] == best
    assert summary["final"]["eval_accuracy"] == pytest.approx(
        float(rows[best - 1]["eval_accuracy"]))
    assert _global_accuracy(config, run_dir / "model") == pytest.approx(
        summary["final"]["eval_accuracy"], abs=1e-6)
    validation = sum(len(r) for r in task_resources(config).federation.client_test_rows)
    assert summary["centralized"]["validation_examples"] == validation > 0
    assert summary["centralized"]["examples_seen"] == len(rows) * summary["centralized"][
        "pooled_train_examples"]


def test_run_reference_records_the_gap_and_reuses_a_finished_reference(tmp_path):
    config = tiny_config(tmp_path, "run.reference=true", "run.dir=" + str(tmp_path / "a"))
    launch(config)
    summary = _summary(tmp_path / "a")
    reference = _summary(tmp_path / "a" / "centralized")
    assert summary["status"] == "finished" and reference["status"] == "finished"
    assert summary["centralized_accuracy"] == reference["final"]["eval_accuracy"]
    assert summary["gap_to_centralized"] == pytest.approx(
        reference["final"]["eval_accuracy"] - summary["final"]["eval_accuracy"], abs=1e-6)
    assert reference["centralized"]["examples_seen"] == summary["centralized"]["examples_seen"]
    # another strategy, same data and optimizer: the finished reference is reused as it is
    shared = tmp_path / "a" / "centralized"
    stamp = (shared / "metrics.csv").stat().st_mtime_ns
    other = tiny_config(tmp_path, "run.reference=true", "strategy.name=fedavgm",
                        "run.dir=" + str(tmp_path / "b"), "run.reference_dir=" + str(shared))
    launch(other)
    assert (shared / "metrics.csv").stat().st_mtime_ns == stamp
    assert _summary(tmp_path / "b")["centralized_accuracy"] == summary["centralized_accuracy"]
    assert not (tmp_path / "b" / "centralized").exists()
    # another learning rate changes the reference: it is trained again in its place
    changed = tiny_config(tmp_path, "run.reference=true", "client.lr=0.05",
                          "run.dir=" + str(tmp_path / "c"), "run.reference_dir=" + str(shared))
    launch(changed)
    assert "lr = 0.05" in (shared / "config.toml").read_text()
    assert _summary(tmp_path / "c")["centralized_accuracy"] == _summary(shared)["final"][
        "eval_accuracy"]


def test_the_reference_config_drops_what_a_centralized_run_does_not_read(tmp_path):
    config = tiny_config(tmp_path, "strategy.name=fedavgm", "strategy.server_momentum=0.5",
                         "strategy.fraction_train=0.5", "privacy.mode=local",
                         "privacy.noise_multiplier=1.0", "attack.name=alie", "attack.fraction=0.25",
                         "run.reference=true")
    reference = centralized_config(config, "examples", "/somewhere")
    assert reference.engine.backend == "central" and reference.privacy.mode == "none"
    assert reference.strategy.name == "fedavg" and reference.strategy.fraction_train == 0.5
    assert reference.attack.name == "none" and not reference.run.reference
    assert reference.client == config.client and reference.data == config.data
    assert reference == centralized_config(
        tiny_config(tmp_path, "strategy.fraction_train=0.5"), "examples", "/somewhere")


@pytest.mark.parametrize("overrides,message", [
    (["engine.backend=central", "privacy.mode=local", "privacy.noise_multiplier=1"],
     "privacy.mode = 'local' is not allowed with engine.backend = 'central'"),
    (["engine.backend=central", "faults.crash_probability=0.5"],
     "faults.crash_probability = 0.5 is not allowed with engine.backend = 'central'"),
    (["engine.backend=central", "run.reference=true"],
     "run.reference = true is not allowed with engine.backend = 'central'"),
    (["engine.backend=central", "engine.central_until=converged",
      "data.local_test_fraction=0"],
     "data.local_test_fraction = 0 is not allowed with engine.central_until = 'converged'"),
    (["engine.central_until=converged"],
     "engine.central_until = 'converged' is not allowed with engine.backend = 'inprocess'"),
    (["engine.backend=central", "engine.central_until=soon"],
     "engine.central_until = 'soon' is not allowed: must be one of 'examples', 'converged'"),
])
def test_bad_centralized_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        load_config(None, [*MLP_DIGITS, *overrides])


def test_fedtune_run_central_and_report_show_the_reference(tmp_path, capsys):
    from fedtune.cli import main

    out = tmp_path / "fed"
    assert main(["run", "--output", str(out), *sum((["--set", o] for o in MLP_DIGITS), []),
                 "--set", "run.reference=true"]) == 0
    printed = capsys.readouterr().out
    summary = _summary(out)
    assert f"centralized reference {summary['centralized_accuracy']:.4f}" in printed
    assert f"gap to centralized {summary['gap_to_centralized']:+.4f}" in printed
    assert main(["run", "--central", "--output", str(tmp_path / "central"),
                 *sum((["--set", o] for o in MLP_DIGITS), [])]) == 0
    printed = capsys.readouterr().out
    assert "engine central" in printed and "centralized (examples): " in printed
    assert _summary(tmp_path / "central")["runtime"]["backend"] == "central"
    assert main(["report", str(tmp_path / "central")]) == 0
    assert "centralized on the pooled data of 4 clients" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "gap to centralized" in capsys.readouterr().out
    # a finished centralized run has nothing to resume (an unfinished one is refused)
    assert main(["run", "--resume", str(tmp_path / "central")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not math.isnan(summary["gap_to_centralized"])
