"""The Python API: fedtune.run / fedtune.sweep / fedtune.load_run return a run's results as data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fedtune
from fedtune.config import ConfigError, load_config
from tests.conftest import MLP_DIGITS, REPO, rows_of

TINY = {override.split("=")[0]: override.split("=", 1)[1] for override in MLP_DIGITS}


def _overrides(**extra):
    """MLP_DIGITS as a dict of Python values (what a notebook writes)."""
    values = {"data.dataset": "digits", "model.kind": "mlp", "model.hidden_sizes": [32],
              "data.num_clients": 4, "data.partitioner": "iid", "run.rounds": 2,
              "client.lr": 0.01, "client.optimizer": "adamw", "client.local_steps": 5,
              "client.batch_size": 32, "engine.backend": "inprocess", "data.max_examples": 0,
              "strategy.fraction_train": 1.0, "strategy.fraction_evaluate": 1.0}
    assert set(values) == set(TINY)
    return {**values, **extra}


def test_run_returns_its_metrics_summary_and_a_model_that_predicts(tmp_path, capsys):
    result = fedtune.run(overrides=_overrides(), output=tmp_path / "run")
    assert result.run_dir == tmp_path / "run"
    csv_rows = rows_of(tmp_path / "run" / "metrics.csv")
    assert list(result.metrics["round"]) == [1, 2]
    np.testing.assert_allclose(result.metrics["eval_accuracy"],
                               [float(r["eval_accuracy"]) for r in csv_rows])
    assert len(result.clients) == 2 * 4 and "examples_trained" in result.clients
    assert result.summary["final"]["eval_accuracy"] == pytest.approx(
        float(csv_rows[-1]["eval_accuracy"]))
    assert set(result.plots) == {"accuracy_loss", "partitions"}
    assert result.config.run.rounds == 2
    out = capsys.readouterr().out
    assert "loading the data and the model" in out and out.count("\n    2 ") == 1

    from fedtune.task import task_resources

    resources = task_resources(result.config)
    rows = resources.federation.test_rows
    predicted = result.load_model().predict(resources.federation.data.features[rows])
    truth = [resources.federation.data.label_names[label]
             for label in resources.federation.data.labels[rows]]
    accuracy = np.mean(np.array(predicted) == np.array(truth))
    assert accuracy == pytest.approx(result.summary["final"]["eval_accuracy"], rel=1e-5)


def test_run_takes_a_file_a_config_or_a_dict_and_list_overrides(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[run]\nrounds = 1\n")
    from_file = fedtune.run(file, list(MLP_DIGITS[:-2]) + ["run.rounds=1"],
                            output=tmp_path / "a", progress=False)
    config = load_config(None, MLP_DIGITS)
    config.run.rounds = 1
    from_config = fedtune.run(config, output=tmp_path / "b", progress=False)
    from_dict = fedtune.run({"run": {"rounds": 1}}, _overrides(**{"run.rounds": 1}),
                            output=tmp_path / "c", progress=False)
    accuracies = {r.summary["final"]["eval_accuracy"] for r in (from_config, from_dict)}
    assert len(accuracies) == 1 and from_file.summary["rounds_completed"] == 1


def test_run_refuses_bad_input_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="model.hidden_sizes = \\[8\\] is not allowed with "
                                          "model.kind = 'hf'"):
        fedtune.run(overrides={"model.hidden_sizes": [8]}, output=tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("")
    with pytest.raises(ConfigError, match="must be a new or empty directory"):
        fedtune.run(overrides=_overrides(), output=tmp_path / "full")
    with pytest.raises(ConfigError, match="must be a run directory"):
        fedtune.load_run(tmp_path)
    assert not (tmp_path / "x").exists()


def test_a_text_model_predicts_label_names_for_new_sentences(tmp_path):
    result = fedtune.run(overrides={
        "data.dataset": "rotten_tomatoes", "data.max_examples": 400, "data.num_clients": 3,
        "model.kind": "mlp", "model.num_features": 512, "run.rounds": 1,
        "client.local_steps": 2, "engine.backend": "inprocess"},
        output=tmp_path / "text", progress=False)
    model = fedtune.load_run(result.run_dir).load_model()
    labels = model.predict(["a wonderful, moving film", "a dull and lifeless mess"])
    assert set(labels) <= {"fresh", "rotten"} and len(labels) == 2
    probabilities = model.predict_proba(["a wonderful, moving film"])
    assert probabilities.shape == (1, 2) and probabilities.sum() == pytest.approx(1.0)


def test_sweep_returns_its_results_table_and_runs(tmp_path):
    file = tmp_path / "sweep.toml"
    file.write_text(f"""
[sweep]
name = "api"
output_dir = "{tmp_path / 'sweeps'}"
[sweep.grid]
"client.lr" = [0.001, 0.01]
"run.seed" = [0, 1]
[data]
dataset = "digits"
num_clients = 3
partitioner = "iid"
[model]
kind = "mlp"
hidden_sizes = [16]
[client]
local_steps = 2
[run]
rounds = 1
[engine]
backend = "inprocess"
""")
    study = fedtune.sweep(file, grid={"run.seed": [0]}, progress=False)
    assert list(study.results["client.lr"]) == [0.001, 0.01]
    assert list(study.table["n"]) == [1, 1]
    assert [r.summary["final"]["eval_accuracy"] for r in study.runs] == list(
        study.results["eval_accuracy"])


def test_importing_fedtune_loads_no_heavy_library():
    probe = ("import sys, fedtune\nfedtune.run\nprint(sorted({m.split('.')[0] for m in "
             "sys.modules} & {'torch', 'flwr', 'ray', 'transformers', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_save_best_keeps_the_best_rounds_model(tmp_path):
    result = fedtune.run(overrides=_overrides(**{"run.save_best": True, "run.rounds": 4,
                                                 "client.lr": 0.3, "client.optimizer": "sgd"}),
                         output=tmp_path / "best", progress=False)
    accuracies = list(result.metrics["eval_accuracy"])
    best_round = int(np.argmax(accuracies)) + 1
    assert result.summary["best"] == {"eval_accuracy": pytest.approx(max(accuracies)),
                                      "round": best_round, "model": "model_best"}
    from fedtune.task import task_resources

    federation = task_resources(result.config).federation
    features = federation.data.features[federation.test_rows]
    truth = np.array([federation.data.label_names[i]
                      for i in federation.data.labels[federation.test_rows]])
    for which, expected in (("best", max(accuracies)), ("final", accuracies[-1])):
        predicted = np.array(result.load_model(which).predict(features))
        assert np.mean(predicted == truth) == pytest.approx(expected, rel=1e-5), which


def test_clients_csv_counts_the_examples_each_client_trained_on(tmp_path):
    steps = fedtune.run(overrides=_overrides(), output=tmp_path / "steps", progress=False)
    assert set(steps.clients["examples_trained"]) == {5 * 32}  # local_steps x batch_size
    epoch = fedtune.run(overrides=_overrides(**{"client.local_steps": 0,
                                                "client.local_epochs": 1}),
                        output=tmp_path / "epoch", progress=False)
    assert list(epoch.clients["examples_trained"]) == list(epoch.clients["num_examples"])


class Recorder(fedtune.Callback):
    """Every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_run_start(self, config, run_dir):
        self.calls.append(("start", config.run.rounds, run_dir))

    def on_evaluate(self, server_round, metrics):
        self.calls.append(("evaluate", server_round, metrics))

    def on_round_end(self, info):
        self.calls.append(("round_end", info))

    def on_save(self, what, path):
        self.calls.append(("save", what, path))

    def on_run_end(self, summary):
        self.calls.append(("end", summary))


def test_callbacks_see_every_round_and_early_stopping_ends_the_run(tmp_path):
    """EarlyStopping that no gain satisfies (min_delta 1): round 1 sets the best, round 2
    does not beat it, the run stops after round 2 of 5 and finishes as any run does."""
    recorder = Recorder()
    stopper = fedtune.EarlyStopping("eval_accuracy", patience=1, min_delta=1.0)
    result = fedtune.run(overrides=_overrides(**{"run.rounds": 5, "run.save_best": True}),
                         output=tmp_path / "run", progress=False,
                         callbacks=[recorder, stopper])
    csv_rows = rows_of(tmp_path / "run" / "metrics.csv")
    assert [r["round"] for r in csv_rows] == ["1", "2"]
    summary = result.summary
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["stop_reason"] == (
        "early stopping: eval_accuracy has not improved by more than 1 for 1 rounds (best "
        f"{float(csv_rows[0]['eval_accuracy']):.4f} at round 1)")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    kinds = [call[0] for call in recorder.calls]
    assert kinds[0] == "start" and recorder.calls[0][1:] == (5, tmp_path / "run")
    assert kinds[-1] == "end" and recorder.calls[-1][1] == summary
    evaluations = [call for call in recorder.calls if call[0] == "evaluate"]
    assert [call[1] for call in evaluations] == [1, 2]
    for (_, _, metrics), row in zip(evaluations, csv_rows, strict=True):
        assert metrics["eval_accuracy"] == pytest.approx(float(row["eval_accuracy"]), rel=1e-5)
        assert set(metrics) == {"eval_loss", "eval_accuracy", "eval_macro_f1",
                                "federated_eval_loss", "federated_eval_accuracy"}
    ends = [call[1] for call in recorder.calls if call[0] == "round_end"]
    assert [info.round for info in ends] == [1, 2] and ends[0].rounds == 5
    assert len(ends[0].clients) == 4 and ends[0].run_dir == tmp_path / "run"
    assert ends[1].metrics["clients_ok"] == int(csv_rows[1]["clients_ok"])
    saves = [call[1:] for call in recorder.calls if call[0] == "save"]
    assert ("best_model", tmp_path / "run" / "model_best") in saves  # round 1 is a best
    assert [p for what, p in saves if what == "checkpoint"] == [
        tmp_path / "run" / "checkpoint"] * 2  # run.checkpoint_every = 1
    assert saves[-1] == ("model", tmp_path / "run" / "model")


def test_callbacks_must_be_callback_objects(tmp_path):
    with pytest.raises(ConfigError, match="callbacks = .* is not allowed: must be a list of "
                                          "fedtune.Callback objects"):
        fedtune.run(overrides=_overrides(), output=tmp_path / "run", callbacks=[print])
    with pytest.raises(ValueError, match="metric = 'accuracy' is not allowed"):
        fedtune.EarlyStopping("accuracy")


@pytest.mark.slow
def test_the_documented_api_example_learns(tmp_path):
    """The README's / guide's example: mlp_digits.toml in process (20 rounds) gives a model
    well above chance (0.833 measured; majority class 0.100) that predicts many classes."""
    result = fedtune.run("simulations/mlp_digits.toml", overrides={"engine.backend": "inprocess"},
                         output=tmp_path / "example", progress=False)
    assert result.summary["final"]["eval_accuracy"] > 0.7
    from fedtune.task import task_resources

    resources = task_resources(result.config)
    predicted = result.load_model().predict(
        resources.federation.data.features[resources.federation.test_rows])
    assert len(set(predicted)) >= 8
