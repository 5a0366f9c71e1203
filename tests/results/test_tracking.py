"""[tracking]: what a run sends to TensorBoard and MLflow, read back with their own readers and
compared with metrics.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtune.config import ConfigError, to_run_config
from fedtune.engine.inprocess import run_inprocess
from fedtune.results.run_dir import METRIC_NUMBER_COLUMNS
from fedtune.results.tracking import check_tracking, mlflow_uri
from tests.conftest import rows_of, tiny_config

TRACKED = ["tracking.tensorboard=true", "tracking.mlflow=true", "run.rounds=3",
           "strategy.fraction_train=0.5", "privacy.mode=local", "privacy.target_epsilon=8",
           "privacy.delta=1e-3"]


def _csv_columns(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metrics.csv column with values, as (round, value) pairs."""
    columns: dict[str, list[tuple[int, float]]] = {}
    for row in rows_of(run_dir / "metrics.csv"):
        for column in METRIC_NUMBER_COLUMNS:
            if row[column] != "":
                columns.setdefault(column, []).append((int(row["round"]), float(row[column])))
    return columns


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tracked")
    config = tiny_config(tmp_path, *TRACKED, f"run.output_dir={tmp_path / 'runs'}")
    return config, run_inprocess(config).path


def test_tensorboard_scalars_are_the_metrics_csv_columns(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = tracked_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0,
                                                                  "histograms": 0})
    events.Reload()
    expected = _csv_columns(run_dir)
    assert {"eval_accuracy", "train_loss", "bytes_up", "bytes_down", "clients_ok",
            "clients_failed", "wall_s", "max_client_epsilon"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for column, values in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(column)]
        assert [step for step, _ in logged] == [step for step, _ in values], column
        for (_, got), (_, want) in zip(logged, values, strict=True):
            assert got == pytest.approx(want, rel=1e-5), column
    clients = rows_of(run_dir / "clients.csv")
    histogram = events.Histograms("clients/train_loss")
    assert [h.step for h in histogram] == [1, 2, 3]
    for h in histogram:  # one entry per client that trained in that round
        losses = [float(c["train_loss"]) for c in clients if int(c["round"]) == h.step]
        assert h.histogram_value.num == len(losses) == 2
        assert h.histogram_value.sum == pytest.approx(sum(losses), rel=1e-5)
    assert [h.step for h in events.Histograms("clients/epsilon")] == [1, 2, 3]


def test_mlflow_run_holds_the_config_the_metrics_and_the_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    config, run_dir = tracked_run
    uri = mlflow_uri(config)
    assert uri == f"sqlite:///{run_dir.parent}/mlflow.db"  # beside the run directory
    assert (run_dir.parent / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.run.name)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params == {k: str(v) for k, v in to_run_config(config).items()}
    for column, values in _csv_columns(run_dir).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                              column))
        assert [step for step, _ in history] == [step for step, _ in values], column
        for (_, got), (_, want) in zip(history, values, strict=True):
            assert got == pytest.approx(want, rel=1e-5) or (math.isinf(got)
                                                            and math.isinf(want)), column
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "config.toml", "plots", "model"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model_files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/accuracy_loss.png" in plots
    # the artifacts lie beside the database, not in ./mlruns of the working directory
    assert run.info.artifact_uri.startswith((run_dir.parent / "mlartifacts").as_uri())
    assert list((run_dir.parent / "mlartifacts").rglob("model.safetensors"))


def test_a_missing_tracking_library_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="tracking.mlflow = true is not allowed here: mlflow "
                                          "is not installed; pip install 'fedtune\\[tracking\\]'"):
        check_tracking(tiny_config(tmp_path, "tracking.mlflow=true"))


def test_a_sweep_logs_one_mlflow_run_per_point_under_one_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    from fedtune.studies.sweep import load_sweep, run_sweep

    file = tmp_path / "sweep.toml"
    file.write_text(f"""
[sweep]
name = "tracked-sweep"
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
output_dir = "{tmp_path / 'runs'}"
[tracking]
mlflow = true
[engine]
backend = "inprocess"
""")
    spec = load_sweep(file)
    rows = run_sweep(spec, run_inprocess)
    client = MlflowClient(tracking_uri=f"sqlite:///{spec.directory / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked-sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(Path(r["run_dir"]).name
                                                           for r in rows)
    for run in runs:
        accuracy = client.get_metric_history(run.info.run_id, "eval_accuracy")[-1].value
        row = next(r for r in rows if Path(r["run_dir"]).name == run.info.run_name)
        assert accuracy == pytest.approx(row["eval_accuracy"], rel=1e-5)
        assert run.data.params["client.lr"] == str(row["client.lr"])
