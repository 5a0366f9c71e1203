"""Experiment tracking: the rows a run writes, also sent to TensorBoard and MLflow (``[tracking]``).

- ``tracking.tensorboard``: every metrics.csv column as a scalar per round (accuracy, losses,
  ε, bytes, clients ok and failed, ...) and histograms over the round's clients (train loss,
  time, examples trained, ε) in ``<run dir>/tb/``, written with torch's ``SummaryWriter``:
  ``tensorboard --logdir runs``.
- ``tracking.mlflow``: one MLflow run per fedtune run, in the experiment
  ``tracking.mlflow_experiment`` (default ``run.name``; a sweep's points share the sweep's):
  the resolved config flattened as params, every metrics.csv column per round, and at the end
  summary.json, the CSV files, the plots and the model as artifacts. The store is
  ``tracking.mlflow_uri``, by default MLflow's recommended SQLite store beside the runs
  (``<folder of the run directory>/mlflow.db``, artifacts in ``mlartifacts/`` next to it);
  ``<run dir>/tracking.json`` records the MLflow run, so a resumed run logs into the same one.

The server's ``fedtune.server.listeners.Tracking`` calls these trackers as rounds end. Both
libraries are optional (``pip install 'fedtune[tracking]'``) and imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from fedtune.config import Config, ConfigError, to_run_config
from fedtune.results.run_dir import (
    METRIC_NUMBER_COLUMNS,
    ClientRow,
    RoundRow,
    RunDirectory,
    check_creatable,
)

# clients.csv columns drawn as a histogram over a round's clients
CLIENT_HISTOGRAMS = ("train_loss", "duration_s", "examples_trained", "num_examples", "epsilon")
TRACKING_FILE = "tracking.json"
MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"  # the default store, beside the runs


def check_tracking(config: Config) -> None:
    """The libraries ``[tracking]`` asks for are installed, and MLflow's local store (a folder
    or a SQLite database file) can be made (checked before any work starts)."""
    for key, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if getattr(config.tracking, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.{key} = true is not allowed here: {module} is not "
                              "installed; pip install 'fedtune[tracking]'")
    if config.tracking.mlflow:
        uri = mlflow_uri(config)
        scheme = uri.partition(":")[0].lower() if ":" in uri else ""
        folder = None
        if scheme == "file" or len(scheme) <= 1:  # a folder (C: is a drive)
            folder = Path(url2pathname(urlparse(uri).path)) if scheme == "file" else Path(uri)
        elif scheme == "sqlite" and uri.startswith("sqlite:///"):  # the database's folder
            folder = Path(uri.removeprefix("sqlite:///")).parent
        if folder is not None:
            check_creatable(folder, "tracking.mlflow_uri =")


def _number(value: Any) -> float | None:
    """A metric value as a float; None for a missing one (NaN included)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


class Tracker:
    """One tracking library's side of a run; every hook does nothing unless overridden."""

    def start(self, config: Config, run_dir: RunDirectory, first_round: int) -> None:
        """Before the first round of this session (``first_round`` > 1 on resume)."""

    def round(self, row: RoundRow, clients: list[ClientRow]) -> None:
        """A round's metrics.csv row and its clients.csv rows."""

    def finish(self, run_dir: RunDirectory) -> None:
        """Every round is done and the run directory is complete."""

    def close(self, failed: bool) -> None:
        """The run ended early (a failure, or a stop that leaves it resumable)."""


class TensorBoardTracker(Tracker):
    """Scalars and per-client histograms in ``<run dir>/tb/``."""

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, config: Config, run_dir: RunDirectory, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events of rounds after the checkpoint (dropped from the CSVs) go too
        self.writer = SummaryWriter(log_dir=str(run_dir.path / "tb"),
                                    purge_step=first_round if first_round > 1 else None)

    def round(self, row: RoundRow, clients: list[ClientRow]) -> None:
        for column in METRIC_NUMBER_COLUMNS:
            value = _number(getattr(row, column))
            if value is not None:
                self.writer.add_scalar(column, value, row.round)
        for column in CLIENT_HISTOGRAMS:
            values = [v for c in clients if (v := _number(getattr(c, column))) is not None
                      and math.isfinite(v)]
            if values:
                self.writer.add_histogram(f"clients/{column}", np.array(values), row.round)
        self.writer.flush()

    def finish(self, run_dir: RunDirectory) -> None:
        self.writer.close()

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


def mlflow_home(config: Config) -> Path:
    """The folder that holds the run directory (``run.output_dir`` when it is not set yet):
    the default MLflow store lives there, beside the runs."""
    return (Path(config.run.dir).parent if config.run.dir
            else Path(config.run.output_dir)).resolve()


def mlflow_uri(config: Config) -> str:
    """``tracking.mlflow_uri``, or MLflow's recommended local store, a SQLite database beside
    the runs: ``sqlite:///<folder of the run directory>/mlflow.db``."""
    if config.tracking.mlflow_uri:
        return config.tracking.mlflow_uri
    return f"sqlite:///{mlflow_home(config) / MLFLOW_DB}"


class MlflowTracker(Tracker):
    """One MLflow run: params, per-round metrics, artifacts."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""

    def start(self, config: Config, run_dir: RunDirectory, first_round: int) -> None:
        uri = mlflow_uri(config)
        if uri.startswith("file:"):  # a plain-file store the user asked for: MLflow 3 keeps it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # behind this switch
        # the default store's artifacts go beside its database, not to ./mlruns of wherever
        # the command was started
        artifacts = (None if config.tracking.mlflow_uri
                     else (mlflow_home(config) / MLFLOW_ARTIFACTS).as_uri())
        mlflow_home(config).mkdir(parents=True, exist_ok=True)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        record = run_dir.path / TRACKING_FILE
        if first_round > 1 and record.is_file():  # a resumed run goes on in its MLflow run
            self.run_id = json.loads(record.read_text())["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = config.tracking.mlflow_experiment or config.run.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifacts))
        run = self.client.create_run(experiment_id, run_name=run_dir.path.name,
                                     tags={"fedtune.run_dir": str(run_dir.path)})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in to_run_config(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_BATCH])
        record.write_text(json.dumps({"mlflow_tracking_uri": uri,
                                      "mlflow_experiment": name,
                                      "mlflow_run_id": self.run_id}, indent=2))

    def round(self, row: RoundRow, clients: list[ClientRow]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(column, value, now, row.round) for column in METRIC_NUMBER_COLUMNS
                   if (value := _number(getattr(row, column))) is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: RunDirectory) -> None:
        for name in ("summary.json", "config.toml", "metrics.csv", "clients.csv",
                     "partitions.csv"):
            if (run_dir.path / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir.path / name))
        for folder in (run_dir.plots_dir, run_dir.model_dir, run_dir.best_model_dir):
            if folder.is_dir():
                self.client.log_artifacts(self.run_id, str(folder), folder.name)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def close(self, failed: bool) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "KILLED")


def trackers(config: Config) -> list[Tracker]:
    """The trackers ``[tracking]`` switches on."""
    found: list[Tracker] = []
    if config.tracking.tensorboard:
        found.append(TensorBoardTracker())
    if config.tracking.mlflow:
        found.append(MlflowTracker())
    return found
