"""The run directory: the results contract every runtime writes.

```
<run dir>/config.toml  env.json  metrics.csv  clients.csv  partitions.csv  summary.json
          log.txt  model/  plots/  (model_best/, tb/, tracking.json, personal.csv as
          configured)
```

Rows are appended and flushed as each round ends, so a run that dies keeps every finished
round on disk.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import Config, ConfigError, TrackingSection, from_dict, to_toml
from fedtune.errors import one_line
from fedtune.results.env_info import environment
from fedtune.results.lock import LOCK_NAME


@dataclass
class RoundRow:
    """One line of metrics.csv (the contract's columns, then federated evaluation)."""

    round: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    eval_macro_f1: float | None
    epsilon: float | None
    max_client_epsilon: float | None
    clip_norm: float | None  # central DP: the bound of this round
    clipped_fraction: float | None  # central DP, adaptive: released (noised) clipped share
    noise_std: float | None  # central DP: noise std per coordinate of the mean update
    clients_sampled: int
    clients_ok: int
    clients_failed: int
    bytes_up: int
    bytes_down: int
    wall_s: float
    federated_eval_loss: float | None = None
    federated_eval_accuracy: float | None = None
    model_update: str = "applied"  # or "kept: <why the global model stayed as it was>"
    replies_dropped: int = 0  # replies that answered no message waiting for one
    # an attacked run ([attack], fedtune.server.attack_metrics); empty otherwise
    attack_success_rate: float | None = None  # a backdoor: triggered tests classed as target
    malicious_filtered: float | None = None  # attackers' updates rejected or left out (TPR)
    benign_filtered: float | None = None  # honest updates rejected or left out (FPR)
    # with devices: the virtual clock when the round (an asynchronous run: the server update)
    # ended, seconds since the run began (fedtune.devices.clock)
    virtual_time_s: float | None = None
    # personal evaluation (run.personal_eval, a personalised strategy), in the rounds it ran:
    # every client's own model (personalised, or the global one) on its local test split
    personal_mean: float | None = None
    personal_median: float | None = None
    personal_p10: float | None = None
    personal_worst: float | None = None
    personal_std: float | None = None
    personal_worse_than_global: float | None = None  # share of clients
    personal_worse_than_local: float | None = None  # share of clients (run.local_reference)


@dataclass
class ClientRow:
    """One line of clients.csv: one client in one phase of one round. ``phase`` = ``train``:
    every client sampled for training, with its status (ok, rejected, failed, timeout; with
    devices also straggler and offline: guide/devices.md) and,
    for a sound reply, its metrics: ``num_examples`` is the size of its training split (what
    FedAvg weights by); ``examples_trained`` is the sum of the sizes of the batches its local
    steps took (the client's ``examples-seen``): at most local_steps x batch_size, less when a
    batch is partial (a client with fewer examples than a batch, the last batch of a pass
    through its data) or, under DP-SGD, what Poisson sampling drew; with local_epochs, its
    examples times the epochs. ``phase`` = ``evaluate``: a client sampled for federated
    evaluation whose reply did not count (rejected, failed, timeout), with the reason; the
    sound evaluations are metrics.csv's federated_eval_* columns."""

    round: int
    client_id: int | None
    num_examples: int | None
    train_loss: float | None
    epsilon: float | None
    duration_s: float | None
    status: str
    reason: str = ""
    examples_trained: int | None = None
    phase: str = "train"
    # with devices: when the client started on the virtual clock, how long its work took
    # there, and (asynchronous runs) how many server updates happened meanwhile
    virtual_start_s: float | None = None
    virtual_duration_s: float | None = None
    staleness: int | None = None


PERSONAL_COLUMNS = ["round", "client_id", "model", "accuracy", "loss", "examples"]
METRICS_COLUMNS = [f.name for f in fields(RoundRow)]
# the per-round numbers (trackers plot these; model_update is a text)
METRIC_NUMBER_COLUMNS = [f.name for f in fields(RoundRow)[1:] if f.type not in ("str", str)]
CLIENT_COLUMNS = [f.name for f in fields(ClientRow)]


# the text columns a client's reply can reach: one printable, capped line each
_TEXT_COLUMNS = ("reason", "model_update")
# a file of an older version may hold longer fields than the csv module's default (131,072)
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
_CLIENT_FIELDS = attrgetter(*CLIENT_COLUMNS)  # a ClientRow's values, in clients.csv's order


def _cells(values: Iterable[Any], texts: Sequence[int]) -> list[Any]:
    """One CSV line: the values at ``texts`` (a text column's positions) one printable line
    each, a float to 6 significant digits, NaN and None empty (the csv module writes None as
    an empty field)."""
    line = list(values)
    for i in texts:
        if line[i]:
            line[i] = one_line(line[i])
    return [("" if math.isnan(v) else f"{v:.6g}") if isinstance(v, float) else v
            for v in line]


def _append(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Rows (column -> value; a column left out is empty) appended to the CSV file ``path``,
    which gets ``columns`` as its header when new."""
    unknown = {key for row in rows for key in row} - set(columns)
    if unknown:
        raise ValueError(f"dict contains fields not in fieldnames: {sorted(unknown)}")
    _append_lines(path, columns, ([row.get(k, "") for k in columns] for row in rows))


def _append_lines(path: Path, columns: list[str], lines: Iterable[Iterable[Any]]) -> None:
    """Lines of values in ``columns`` order appended to the CSV file ``path`` (a new file
    gets the header first), flushed. csv.DictWriter's lines, from lists: its per-row key
    checks cost more than the line itself at thousands of clients a round."""
    texts = [i for i, column in enumerate(columns) if column in _TEXT_COLUMNS]
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerows(_cells(line, texts) for line in lines)
        handle.flush()


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV file, whatever the length of a field (a run written before
    reasons were capped holds longer ones than the csv module reads by default)."""
    if not path.exists():
        return []
    previous = csv.field_size_limit(_FIELD_LIMIT)
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            return list(csv.DictReader(handle))
    finally:
        csv.field_size_limit(previous)


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def default_run_path(config: Config) -> Path:
    """``<run.output_dir>/<run.name>-<UTC time>``, with a counter if that exists already."""
    base = Path(config.run.output_dir) / f"{config.run.name}-{utc_stamp()}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    return target


def check_creatable(path: Path, what: str) -> None:
    """A directory can be made at ``path`` (or is one): raise a one-line ``ConfigError`` naming
    ``what`` (``--output``, ``tracking.mlflow_uri``) when a file is in the way or its nearest
    existing folder takes no new entry (read-only, /proc). The folder is probed by making and
    removing a directory in it: permissions alone do not tell (root may write anywhere)."""
    where = Path(os.path.abspath(path))
    ancestor = where
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is not allowed: {str(ancestor)!r} is a file, "
                          "not a directory")
    if ancestor == where:
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedtune-probe-", dir=ancestor))
    except OSError as error:
        raise ConfigError(f"{what} {str(path)!r} is not allowed: no directory can be made in "
                          f"{str(ancestor)!r} ({error.strerror})") from None


def is_empty_run_dir(path: Path) -> bool:
    """True for a directory a new run may take: missing, empty, or holding only the log.txt
    that the run's launcher opened before it (``fedtune.results.run_log``)."""
    return not path.exists() or all(p.name in ("log.txt", LOCK_NAME) for p in path.iterdir())


class RunDirectory:
    """Writes (and reads back) one run's results."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, config: Config, path: str | Path | None = None) -> RunDirectory:
        """A new directory (``path``, or ``<run.output_dir>/<run.name>-<UTC time>``)."""
        target = Path(path) if path else default_run_path(config)
        if not is_empty_run_dir(target):
            raise FileExistsError(f"run directory {target} exists and is not empty")
        target.mkdir(parents=True, exist_ok=True)
        (target / "plots").mkdir(exist_ok=True)
        run_dir = cls(target.resolve())
        run_dir.write_config(config)
        run_dir.write_json("env.json", environment(config.run.seed))
        return run_dir

    @classmethod
    def open(cls, config: Config) -> RunDirectory:
        """The existing directory ``run.dir`` of a run to resume."""
        target = Path(config.run.dir) if config.run.dir else None
        if target is None or not (target / "config.toml").is_file():
            raise ConfigError(f"run.dir = {config.run.dir!r} is not allowed with run.resume = "
                              "true: must be an existing run directory (with config.toml)")
        return cls(target.resolve())

    def write_config(self, config: Config) -> None:
        """config.toml: the resolved config (as a new run would be started from it)."""
        resolved = copy.deepcopy(config)
        resolved.run.resume = False
        (self.path / "config.toml").write_text(to_toml(resolved), encoding="utf-8")

    def truncate_after(self, server_round: int) -> None:
        """Drop rows of rounds after ``server_round`` (written after the checkpoint was); rows
        written before clients.csv had its ``phase`` column are training rows."""
        for path, columns in ((self.metrics_csv, METRICS_COLUMNS),
                              (self.clients_csv, CLIENT_COLUMNS),
                              (self.personal_csv, PERSONAL_COLUMNS)):
            if path == self.personal_csv and not path.exists():
                continue
            kept = [row for row in read_csv(path) if int(row["round"]) <= server_round]
            if path == self.clients_csv:
                kept = [{"phase": "train", **row} for row in kept]
            partial = path.with_suffix(".tmp")
            partial.unlink(missing_ok=True)
            _append(partial, columns, kept)
            partial.replace(path)
        lines = self.strategy_metrics_jsonl
        if lines.exists():
            kept_lines = [line for line in lines.read_text(encoding="utf-8").splitlines()
                          if line and json.loads(line)["round"] <= server_round]
            partial = lines.with_suffix(".tmp")
            partial.write_text("".join(line + "\n" for line in kept_lines), encoding="utf-8")
            partial.replace(lines)

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def clients_csv(self) -> Path:
        return self.path / "clients.csv"

    @property
    def personal_csv(self) -> Path:
        """Every client's models on its local test split (personal evaluation)."""
        return self.path / "personal.csv"

    def append_personal(self, rows: list[dict[str, Any]]) -> None:
        """personal.csv rows (round, client_id, model, accuracy, loss, examples)."""
        _append(self.personal_csv, PERSONAL_COLUMNS, rows)

    def personal(self) -> list[dict[str, str]]:
        return read_csv(self.personal_csv)

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def best_model_dir(self) -> Path:
        """The best round's model (``run.save_best``)."""
        return self.path / "model_best"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def strategy_metrics_jsonl(self) -> Path:
        return self.path / "strategy_metrics.jsonl"

    def append_round(self, row: RoundRow, clients: list[ClientRow],
                     strategy_metrics: dict[str, Any] | None = None) -> None:
        """The round's clients.csv rows, its metrics.csv row, and (when the strategy
        aggregated any) a strategy_metrics.jsonl line: ``{"round": r, "train": {...}}``."""
        # a ClientRow holds scalars: read its fields (``asdict`` deep-copies each one, which
        # costs more per client than training one on a small model)
        _append_lines(self.clients_csv, CLIENT_COLUMNS, map(_CLIENT_FIELDS, clients))
        _append(self.metrics_csv, METRICS_COLUMNS, [asdict(row)])
        if strategy_metrics:
            line = json.dumps(json_safe({"round": row.round, "train": strategy_metrics}),
                              default=_json_default)
            with self.strategy_metrics_jsonl.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def write_partitions(self, histogram: np.ndarray, label_names: tuple[str, ...]) -> None:
        """partitions.csv: examples per client and label (a million clients' rows at once)."""
        with (self.path / "partitions.csv").open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(["client_id", *label_names, "total"])
            table = np.column_stack([np.arange(len(histogram)), histogram,
                                     histogram.sum(axis=1)]).astype(np.int64)
            np.savetxt(handle, table.reshape(-1, len(label_names) + 2), fmt="%d", delimiter=",",
                       newline="\r\n")  # as csv.writer ends its rows

    def write_json(self, name: str, payload: dict) -> None:
        file = self.path / name
        partial = file.with_suffix(".tmp")
        partial.write_text(json.dumps(payload, indent=2, default=_json_default), encoding="utf-8")
        partial.replace(file)

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def metrics(self) -> list[dict[str, str]]:
        return read_csv(self.metrics_csv)

    def clients(self) -> list[dict[str, str]]:
        return read_csv(self.clients_csv)


def is_finished(run_dir: Path, config: Config) -> bool:
    """True when the run in ``run_dir`` finished with this config (another config - a changed
    sweep file, say - runs again). The saved config is read with today's defaults, so a key
    added since with a default does not count; ``[tracking]`` does not count either (where
    results are logged does not change them)."""
    summary, saved = run_dir / "summary.json", run_dir / "config.toml"
    if not summary.is_file() or not saved.is_file():
        return False
    finished = from_dict(tomllib.loads(saved.read_text(encoding="utf-8")))
    finished.tracking, wanted = TrackingSection(), copy.copy(config)
    wanted.tracking = TrackingSection()
    if finished != wanted:
        return False
    return json.loads(summary.read_text()).get("status") == "finished"


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, ±inf the string "inf"/"-inf"; nested
    structures are cleaned too."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # float("inf") reads it back
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
