"""Typed run configuration.

A run is described by one TOML file with the sections below. Every key has a default, a type
and a check. ``load_config`` reads a file, applies ``--set section.key=value`` overrides and
validates; any user error raises ``ConfigError`` with one line naming the key, the value and
what is allowed, before any work starts.

Four sections are derived from the extension tables (``fedtune.tables``; the classes are
``fedtune.sections``, typed for type checkers by the generated ``fedtune/sections.pyi``):
``[model]`` from the model kinds, ``[strategy]`` from the strategies, ``[privacy]`` from the
privacy modes and ``[engine]`` from the runtimes. Each has a few common keys plus the keys the
table's entries own; the entry that ``kind`` / ``name`` / ``mode`` / ``backend`` picks checks
its own settings.
This module imports neither torch nor Flower nor Ray: a mistake is reported in well under a
second.

The same keys flattened with dots ("data.alpha") are Flower's run_config, so
``flwr run . --run-config "data.alpha=0.1"`` and ``fedtune run --set data.alpha=0.1`` mean the
same thing (``to_run_config`` / ``from_run_config``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.errors import ConfigError, ConfigWarning
from fedtune.sections import (
    CHOOSERS,
    AttackSection,
    DevicesSection,
    EngineSection,
    ModelSection,
    PrivacySection,
    StrategySection,
)
from fedtune.tables import Key, UsedWith, declared_key, key, owners_of, used_with
from fedtune.tables.attacks import check_attack
from fedtune.tables.datasets import DATASETS, check_dataset
from fedtune.tables.devices import check_devices
from fedtune.tables.model_kinds import check_model
from fedtune.tables.privacy_modes import check_privacy
from fedtune.tables.runtimes import RUNTIMES, check_runtime
from fedtune.tables.strategies import STRATEGIES, check_strategy, clients_per_round

__all__ = [
    "Config",
    "ConfigError",
    "ConfigWarning",
    "NoEffect",
    "clients_per_round",
    "config_from_raw",
    "describe",
    "from_dict",
    "from_run_config",
    "keys_without_effect",
    "load_config",
    "personal_evaluation_settings",
    "to_run_config",
    "to_toml",
]

RunConfigValue = bool | int | float | str

PARTITIONERS = ("iid", "dirichlet", "inner_dirichlet", "shards", "quantity_skew", "natural")
OPTIMIZERS = ("adamw", "adam", "sgd")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # cuda:N = the N-th visible GPU
PRECISIONS = ("fp32", "bf16", "fp16")
STRAGGLER_DELAYS = ("constant", "exponential")
CRASH_STAGES = ("train", "setup", "share-keys", "unmask")
INT_BITS = 63  # an integer key fits a signed 64-bit integer (Flower's run config holds those)
MAX_NAME = 200  # characters of run.name: <name>-<UTC time>-<n> must stay a valid file name
# tracking.mlflow_uri schemes MLflow's tracking stores take ('' and file: a folder)
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql",
                  "mssql")


@dataclass
class RunSection:
    name: str = key("fedtune", "run name; the run directory is <output_dir>/<name>-<UTC time>")
    seed: int = key(0, "seed for every random choice (data split, init, sampling, batches)", ge=0)
    rounds: int = key(3, "number of federated rounds", ge=1)
    output_dir: str = key("runs", "folder that receives the run directory")
    dir: str = key("", "exact run directory (must be new or empty); '' = under output_dir")
    max_rounds_without_update: int = key(
        3, "stop after this many rounds in a row without an update of the global model (too "
        "few sound client updates, or an aggregate that is not finite)", ge=1
    )
    checkpoint_every: int = key(
        1, "write <run dir>/checkpoint/ every this many rounds (also on Ctrl-C); 0 = only on "
        "Ctrl-C or failure", ge=0
    )
    resume: bool = key(False, "continue the run in run.dir from its checkpoint "
                                "(`fedtune run --resume RUN_DIR` sets it)")
    save_best: bool = key(False, "also keep the model of the round with the best global test "
                                 "accuracy, in <run dir>/model_best/")
    reference: bool = key(False, "also train the centralized reference (the same model, data "
                                 "and optimizer on the pooled client data, as many examples) "
                                 "and record centralized_accuracy in summary.json")
    reference_dir: str = key("", "run directory of the centralized reference; a finished one "
                                 "with the same config is reused; '' = <run dir>/centralized")
    personal_eval: bool = key(
        False, "evaluate every client on its own local test split (the global model, and the "
        "personalised one where the strategy keeps one) into personal.csv; always on for a "
        "personalised strategy")
    personal_eval_every: int = key(
        0, "personal evaluation every this many rounds, and at the end; 0 = only at the end",
        ge=0)
    local_reference: bool = key(
        False, "also train each client alone (the same model and initial weights, as many "
        "local epochs or steps as all rounds give it) and evaluate it on its local test split "
        "beside the federated models in personal.csv")


@dataclass
class DataSection:
    dataset: str = key(
        "rotten_tomatoes", "offline dataset; files = each SuperNode's own CSV/JSONL (deployment)",
        choices=tuple(DATASETS),
    )
    num_clients: int = key(8, "number of clients (partitions)", ge=1)
    partitioner: str = key(
        "natural", "how examples are split over clients; inner_dirichlet = equal sizes, each "
        "client's label mix from Dirichlet(alpha) (scales to hundreds of clients)",
        choices=PARTITIONERS)
    alpha: float = key(0.5, "Dirichlet concentration over labels", gt=0,
                       used_with=UsedWith("partitioner", ("dirichlet", "inner_dirichlet")))
    labels_per_client: int = key(2, "labels per client", ge=1,
                                 used_with=UsedWith("partitioner", ("shards",)))
    quantity_alpha: float = key(0.5, "Dirichlet concentration over client sizes", gt=0,
                                used_with=UsedWith("partitioner", ("quantity_skew",)))
    natural_key: str = key("", "column that keys natural partitions; '' = dataset's own key",
                           used_with=UsedWith("partitioner", ("natural",)))
    min_client_examples: int = key(
        4, "smallest partition a client may get", ge=2,
        used_with=UsedWith("partitioner", ("dirichlet", "quantity_skew")))
    test_fraction: float = key(0.1, "held-out global test split", gt=0, lt=1)
    local_test_fraction: float = key(0.1, "per-client local test split", ge=0, lt=1)
    local_val_fraction: float = key(
        0.0, "per-client local validation split, held out of the client's training rows: "
        "personalised model selection (fine-tuning steps, local-only epochs) uses it, never "
        "the test split; 0 = none (the last model is taken)", ge=0, lt=1)
    max_examples: int = key(3000, "use a seeded subsample of this many examples; 0 = all",
                              ge=0)
    client_examples: int = key(
        8, "examples each client holds, drawn from the training pool (replicated when the "
        "clients need more than it holds)", ge=1, used_with=UsedWith("dataset", ("generated",)))
    label_names: list[str] = key([], "labels of a files dataset, in index order", kind=list[str],
                                 used_with=UsedWith("dataset", ("files",)))
    test_path: str = key("", "the server's global test file (CSV or JSONL)",
                         used_with=UsedWith("dataset", ("files",)))
    text_column: str = key("text", "column / JSON field holding the text",
                           used_with=UsedWith("dataset", ("files",)))
    label_column: str = key("label", "column / JSON field holding the label",
                            used_with=UsedWith("dataset", ("files",)))


@dataclass
class ClientSection:
    optimizer: str = key("adamw", "local optimizer", choices=OPTIMIZERS)
    lr: float = key(1e-4, "local learning rate", gt=0)
    weight_decay: float = key(0.0, "weight decay", ge=0)
    momentum: float = key(0.0, "SGD momentum", ge=0, lt=1,
                          used_with=UsedWith("optimizer", ("sgd",)))
    local_epochs: int = key(1, "local epochs per round", ge=1,
                            used_with=UsedWith("local_steps", (0,)))
    local_steps: int = key(8, "local optimizer steps per round; 0 = use local_epochs", ge=0)
    batch_size: int = key(16, "local training batch size", ge=1)
    eval_batch_size: int = key(128, "evaluation batch size", ge=1)
    max_grad_norm: float = key(0.0, "clip the gradient norm per step; 0 = off", ge=0)
    device: str = key("auto", "where clients compute: auto (cuda when present), cpu, cuda, "
                              "cuda:N (the N-th visible GPU)")
    precision: str = key(
        "fp32", "local training autocast: fp32 = off, bf16, fp16 (CUDA only, with a gradient "
        "scaler)", choices=PRECISIONS,
    )


@dataclass
class FaultsSection:
    nan_fraction: float = key(
        0.0, "fraction of clients (drawn once) whose every update is NaN", ge=0, le=1
    )
    wrong_shape_fraction: float = key(
        0.0, "fraction of clients (drawn once) whose every update has a tensor of the wrong "
        "shape", ge=0, le=1
    )
    crash_probability: float = key(
        0.0, "probability that a client crashes each time it is asked to train", ge=0, le=1
    )
    crash_stage: str = key(
        "train", "when a crash strikes: train, or a SecAgg+ stage (setup, share-keys: before "
        "its input is masked; unmask: after)", choices=CRASH_STAGES
    )
    straggler_fraction: float = key(
        0.0, "fraction of clients (drawn once) that wait before training", ge=0, le=1
    )
    straggler_delay: str = key("constant", "distribution of a straggler's wait",
                               choices=STRAGGLER_DELAYS,
                               used_with=UsedWith("straggler_fraction", nonzero=True))
    straggler_delay_s: float = key(0.0, "mean of a straggler's wait in seconds", ge=0,
                                   used_with=UsedWith("straggler_fraction", nonzero=True))


@dataclass
class TrackingSection:
    tensorboard: bool = key(False, "write per-round scalars and per-client histograms to <run "
                                   "dir>/tb/ (pip install 'fedtune[tracking]')")
    mlflow: bool = key(False, "log the config, per-round metrics, plots, summary and model to "
                              "MLflow (pip install 'fedtune[tracking]')")
    mlflow_uri: str = key("", "MLflow tracking URI; '' = sqlite:///<folder of the run "
                              "directory>/mlflow.db, beside the runs",
                          used_with=UsedWith("mlflow", (True,)))
    mlflow_experiment: str = key("", "MLflow experiment; '' = run.name (in a sweep: the "
                                     "sweep's name)", used_with=UsedWith("mlflow", (True,)))


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    client: ClientSection = field(default_factory=ClientSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    attack: AttackSection = field(default_factory=AttackSection)
    engine: EngineSection = field(default_factory=EngineSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "client": ClientSection,
    "strategy": StrategySection,
    "privacy": PrivacySection,
    "faults": FaultsSection,
    "attack": AttackSection,
    "engine": EngineSection,
    "devices": DevicesSection,
    "tracking": TrackingSection,
}


def _allowed_text(declared: Key, kind: Any) -> str:
    if declared.choices:
        return "one of " + ", ".join(repr(c) for c in declared.choices)
    bounds = []
    for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if getattr(declared, name) is not None:
            bounds.append(f"{sign} {getattr(declared, name):g}")
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind,
        "a list of names without commas" if typing.get_args(kind) == (str,)
        else "a list of positive integers" if declared.ge is None
        else "a list of integers, each",
    )
    return name + (" " + " and ".join(bounds) if bounds else "")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message: a long one is cut, saying how long it was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return text[:limit] + "..." + length


def _coerce(full_key: str, value: Any, declared: Key) -> Any:
    """Convert one value to the key's type and check it; raise ConfigError naming the key."""
    kind = declared.type

    def bad() -> ConfigError:
        return ConfigError(f"{full_key} = {shown(value)} is not allowed: must be "
                           f"{_allowed_text(declared, kind)}")

    if kind is bool:
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
        else:
            raise bad()
    elif kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not -2**INT_BITS <= out < 2**INT_BITS:
            raise ConfigError(f"{full_key} = {shown(value)} is not allowed: must be below "
                              f"2^{INT_BITS} in size (a 64-bit integer), "
                              f"{_allowed_text(declared, kind)}")
    elif kind is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if math.isnan(out):
            raise bad()
        if math.isinf(out) and not declared.infinite:
            raise ConfigError(f"{full_key} = {value!r} is not allowed: must be a finite "
                              f"{_allowed_text(declared, kind).removeprefix('a ')}")
    elif kind is str:
        if not isinstance(value, str):
            raise bad()
        out = value
    elif typing.get_args(kind) == (str,):  # list[str]
        if isinstance(value, str):  # run_config form: "fresh,rotten"
            value_list = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            value_list = list(value)
        else:
            raise bad()
        if any("," in v for v in value_list):
            raise bad()
        out = value_list
    else:  # list[int]
        if isinstance(value, str):  # run_config form: "256,128"
            parts = [p for p in value.replace(" ", "").split(",") if p]
            try:
                value_list = [int(p) for p in parts]
            except ValueError:
                raise bad() from None
        elif isinstance(value, list):
            value_list = value
        else:
            raise bad()
        least = 1 if declared.ge is None else declared.ge  # positive unless the key says
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= least
                   for v in value_list):
            raise bad()
        out = list(value_list)
    if declared.choices is not None and out not in declared.choices:
        raise bad()
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        checks = (
            (declared.gt, lambda b: out > b),
            (declared.ge, lambda b: out >= b),
            (declared.lt, lambda b: out < b),
            (declared.le, lambda b: out <= b),
        )
        for bound, ok in checks:
            if bound is not None and not ok(bound):
                raise bad()
    return out


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a validated Config from nested sections ({"data": {"alpha": 0.5}})."""
    sections: dict[str, Any] = {}
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            raise ConfigError(
                f"[{section_name}] is not a config section: allowed are "
                + ", ".join(SECTIONS)
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section_name}] must be a table of keys, got {values!r}")
        sections[section_name] = values
    built = {}
    for section_name, section_cls in SECTIONS.items():
        built[section_name] = _build_section(section_name, section_cls,
                                             sections.get(section_name, {}))
    config = Config(**built)
    check_consistency(config)
    return config


def _build_section(section_name: str, section_cls: type, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for name, value in values.items():
        full_key = f"{section_name}.{name}"
        if name not in fields:
            raise ConfigError(
                f"{full_key} is not a config key: [{section_name}] allows "
                + ", ".join(fields)
            )
        kwargs[name] = _coerce(full_key, value, declared_key(fields[name]))
    return section_cls(**kwargs)


def _refuse_foreign_keys(config: Config, section_name: str) -> None:
    """A key owned by other entries of a table must keep its default (it would be ignored)."""
    section = getattr(config, section_name)
    chooser = CHOOSERS[section_name]
    chosen = getattr(section, chooser)
    for f in dataclasses.fields(section):
        owners = owners_of(f)
        value, default = getattr(section, f.name), declared_key(f).default
        if owners and chosen not in owners and value != default:
            raise ConfigError(
                f"{section_name}.{f.name} = {value!r} is not allowed with {section_name}."
                f"{chooser} = {chosen!r}: must be {default!r} (only {', '.join(owners)} "
                f"{'has' if len(owners) == 1 else 'have'} it)"
            )


def check_consistency(config: Config) -> None:
    """Checks that involve more than one key or the file system (no data needed): the general
    ones here, then each table's chosen entry checks its own settings."""
    if not DEVICE_PATTERN.fullmatch(config.client.device):
        raise ConfigError(
            f"client.device = {config.client.device!r} is not allowed: must be 'auto', 'cpu', "
            "'cuda' or 'cuda:N' (N = the index of a visible GPU, e.g. 'cuda:1')"
        )
    if config.client.precision == "fp16" and config.client.device == "cpu":
        raise ConfigError(
            "client.precision = 'fp16' is not allowed with client.device = 'cpu': must be "
            "'fp32' or 'bf16' (fp16 autocast needs CUDA)"
        )
    if (config.client.device.startswith("cuda") and not RUNTIMES[config.engine.backend].in_process
            and config.engine.client_gpus == 0):
        raise ConfigError(
            f"client.device = {config.client.device!r} is not allowed with engine.client_gpus = "
            "0: Ray gives such "
            "clients no GPU; set engine.client_gpus > 0 (0.125 = 8 clients share one GPU)"
        )
    check_dataset(config)
    name = config.run.name
    if (not name or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable()
            or name != name.strip() or len(name) > MAX_NAME):
        raise ConfigError(f"run.name = {shown(name)} is not allowed: must be a plain name of at "
                          f"most {MAX_NAME} characters (printable, no path separators, not '.' "
                          "or '..'), the run directory is <run.output_dir>/<run.name>-<time>")
    _check_mlflow_uri(config)
    node_ids = config.engine.node_ids
    if node_ids and (len(node_ids) != config.data.num_clients
                     or not all(n.isascii() and n.isdigit() for n in node_ids)):
        raise ConfigError(
            f"engine.node_ids = {node_ids!r} is not allowed: must list the decimal node id of "
            f"each of the data.num_clients = {config.data.num_clients} clients, or be []"
        )
    if config.strategy.min_train_clients > config.data.num_clients:
        raise ConfigError(
            f"strategy.min_train_clients = {config.strategy.min_train_clients} is not allowed: "
            f"must be <= data.num_clients = {config.data.num_clients}"
        )
    _check_reference(config)
    check_model(config)
    check_privacy(config)
    _refuse_foreign_keys(config, "engine")
    check_runtime(config)
    check_strategy(config)
    _refuse_foreign_keys(config, "devices")
    check_devices(config)
    _check_faults(config)
    check_attack(config)


def _check_mlflow_uri(config: Config) -> None:
    """``tracking.mlflow_uri`` names a store MLflow can track in (a folder, or a server or
    database URI); whether a folder can be written is checked before a run starts
    (``fedtune.results.tracking.check_tracking``)."""
    uri = config.tracking.mlflow_uri
    scheme = uri.partition(":")[0].lower() if ":" in uri else ""
    if not config.tracking.mlflow or not uri or len(scheme) == 1 or scheme in MLFLOW_SCHEMES:
        return  # '' (the default folder), a path (C: is a drive), or a known scheme
    raise ConfigError(f"tracking.mlflow_uri = {shown(uri)} is not allowed: must be a path, or a "
                      "URI of scheme " + ", ".join(MLFLOW_SCHEMES))


def personal_evaluation_settings(config: Config) -> list[str]:
    """The settings that make a run evaluate every client on its own local test split (the
    personal evaluation): asked for, or a personalised strategy, which always does; empty:
    none."""
    wanted = [f"run.{name} = true" for name in ("personal_eval", "local_reference")
              if getattr(config.run, name)]
    if STRATEGIES[config.strategy.name].personal:
        wanted.append(f"strategy.name = {config.strategy.name!r}")
    return wanted


def _check_local_tests(config: Config) -> None:
    """The personal evaluation measures every client on its own local test split: without one
    it has nothing to measure."""
    if config.data.local_test_fraction > 0:
        return
    wanted = personal_evaluation_settings(config)
    if wanted:
        raise ConfigError(f"data.local_test_fraction = 0 is not allowed with {wanted[0]}: "
                          "must be > 0 (the personal evaluation measures every client on its "
                          "own local test split)")


def _check_reference(config: Config) -> None:
    if DATASETS[config.data.dataset].party_files and (config.run.personal_eval
                                                      or config.run.local_reference):
        key = "personal_eval" if config.run.personal_eval else "local_reference"
        raise ConfigError(f"run.{key} = true is not allowed with data.dataset = "
                          f"{config.data.dataset!r}: must be false (the server holds no "
                          "client's local splits)")
    _check_local_tests(config)
    if not config.run.reference:
        return
    if not RUNTIMES[config.engine.backend].federated:
        raise ConfigError(f"run.reference = true is not allowed with engine.backend = "
                          f"{config.engine.backend!r}: must be false (a centralized run is its "
                          "own reference)")
    if DATASETS[config.data.dataset].party_files:
        raise ConfigError(f"run.reference = true is not allowed with data.dataset = "
                          f"{config.data.dataset!r}: must be false (the server never sees the "
                          "parties' training data)")


# the [strategy] keys that decide how many examples a federated round trains on, which the
# centralized reference matches; its other keys do not change a centralized run
CENTRALIZED_STRATEGY_KEYS = ("fraction_train", "min_train_clients")
CENTRALIZED_SECTIONS = ("run", "data", "model", "client")  # read by a centralized run
CENTRALIZED_RUN_KEYS = ("reference", "reference_dir", "dir", "resume")  # set per reference


def affects_centralized(dotted: str) -> bool:
    """Whether the config key ``section.key`` can change the centralized reference of a run
    (the data, the model, the local optimizer, the rounds and the examples per round)."""
    section, _, name = dotted.partition(".")
    if section == "strategy":
        return name in CENTRALIZED_STRATEGY_KEYS
    return section in CENTRALIZED_SECTIONS and not (section == "run"
                                                    and name in CENTRALIZED_RUN_KEYS)


def centralized_config(config: Config, until: str = "examples", run_dir: str = "") -> Config:
    """The config of ``config``'s centralized reference: ``engine.backend = "central"``
    trained ``until`` "examples" (as many as the federated run) or "converged", in
    ``run_dir``. What a centralized run does not read (the strategy but its sampling
    fraction, privacy, faults, the federated runtime) is reset to its defaults, so runs that
    differ only there share one reference."""
    raw = to_dict(config)
    reference = {section: raw[section] for section in CENTRALIZED_SECTIONS}
    reference["strategy"] = {k: raw["strategy"][k] for k in CENTRALIZED_STRATEGY_KEYS}
    engine = raw["engine"]
    reference["engine"] = {"backend": "central", "central_until": until,
                           **{k: engine[k] for k in ("client_cpus", "central_patience",
                                                     "central_max_epochs")}}
    reference["run"].update(reference=False, reference_dir="", dir=run_dir, resume=False)
    return from_dict(reference)


def _check_faults(config: Config) -> None:
    f, n = config.faults, config.data.num_clients
    for name in ("nan_fraction", "wrong_shape_fraction", "straggler_fraction"):
        fraction = getattr(f, name)
        if 0 < fraction * n < 0.5:  # rounds to no client at all
            raise ConfigError(
                f"faults.{name} = {fraction:g} is not allowed with data.num_clients = {n}: "
                f"must pick at least one client (>= {0.5 / n:g}) or be 0"
            )


# keys a resume may change: where and how long the run goes on, and on which runtime
RESUME_MAY_CHANGE = {"run": {"dir", "output_dir", "rounds", "checkpoint_every", "resume"},
                     "engine": None, "tracking": None}  # None: every key of the section


def check_same_run(saved: Config, config: Config) -> None:
    """``config`` continues the run whose config.toml is ``saved``: every key a resume may
    not change (``RESUME_MAY_CHANGE``) is as it was."""
    before, now = to_dict(saved), to_dict(config)
    for section, values in now.items():
        free = RESUME_MAY_CHANGE.get(section, set())
        for name, value in values.items():
            if free is None or name in free or before[section][name] == value:
                continue
            raise ConfigError(
                f"{section}.{name} = {shown(value)} is not allowed when resuming: must be "
                f"{shown(before[section][name])} as in {config.run.dir}/config.toml (only "
                "run.rounds, run.checkpoint_every, engine.* and tracking.* may change)"
            )


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split "section.key=value"; the value is read as a TOML value, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is not allowed: must look like section.key=value")
    dotted, raw_value = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ConfigError(
            f"--set {text!r} is not allowed: the key must be section.key (e.g. data.alpha)"
        )
    section, key = dotted.split(".")
    return section, key, toml_value(raw_value)


def toml_value(text: str) -> Any:
    """A command-line value read as a TOML value (1e-3, [1, 2], true), else kept as a string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The tables of a TOML file; a missing or broken file is a one-line ConfigError naming
    ``what`` it is (config file, sweep file)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory: must be a TOML file")
    if not file.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:  # utf-8-sig: a byte-order mark (some editors write one) is not part of the text
        return tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: byte "
                          f"{err.object[err.start]:#04x} at offset {err.start}") from None
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                resolved: bool = False) -> Config:
    """Read a TOML config (or the defaults when path is None) and apply --set overrides.

    A key that has no effect with the other settings (``keys_without_effect``) is an error when
    an override sets it, and a ``ConfigWarning`` when the file does. ``resolved``: the file is a
    run's own config.toml; only its keys away from their defaults count (so do those of any
    section that lists every one of its keys, as a copy of a config.toml does).
    """
    raw: dict[str, Any] = {} if path is None else read_toml(path, "config file")
    return config_from_raw(raw, overrides, resolved)


def config_from_raw(raw: Mapping[str, Any], overrides: Iterable[str] = (),
                    resolved: bool = False) -> Config:
    """``load_config`` for the tables of a config already read (``{"data": {"alpha": 0.5}}``,
    ``to_dict`` of a Config with ``resolved``)."""
    raw = {section: dict(table) if isinstance(table, Mapping) else table
           for section, table in raw.items()}
    from_file = set() if resolved else _written_keys(raw)
    from_overrides: set[str] = set()
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        raw[section][key] = value
        from_overrides.add(f"{section}.{key}")
    config = from_dict(raw)
    for ignored in keys_without_effect(config, from_file | from_overrides):
        if ignored.key in from_overrides:
            raise ConfigError(ignored.message(" is not allowed"))
        warnings.warn(ignored.message(), ConfigWarning, stacklevel=2)
    return config


def _written_keys(raw: Mapping[str, Any]) -> set[str]:
    """The keys a config file sets, as section.key; a section that lists all of its keys (a
    copy of a run's resolved config.toml) counts as setting none of them."""
    written = set()
    for section, table in raw.items():
        if not isinstance(table, Mapping):
            continue
        every = section in SECTIONS and set(table) >= {
            f.name for f in dataclasses.fields(SECTIONS[section])}
        if not every:
            written |= {f"{section}.{name}" for name in table}
    return written


@dataclass(frozen=True)
class NoEffect:
    """A key set to a value that the chosen settings ignore."""

    key: str  # section.key
    value: Any
    chooser: str  # section.key of the setting that decides
    chosen: Any
    rule: UsedWith

    def message(self, verdict: str = " has no effect") -> str:
        section = self.key.split(".")[0]
        return (f"{self.key} = {self.value!r}{verdict} with {self.chooser} = {self.chosen!r}: "
                f"only {section}.{self.rule.describe()} uses it")


def keys_without_effect(config: Config, given: Iterable[str] = ()) -> list[NoEffect]:
    """Every key that the chosen settings ignore (``fedtune.tables.UsedWith``: a key owned by
    other table entries, ``client.local_epochs`` while ``client.local_steps`` > 0, ...) and
    that is set: named in ``given`` (what the user wrote), or away from its default."""
    given = set(given)
    found = []
    for section_name in SECTIONS:
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            rule = used_with(f)
            if rule is None:
                continue
            chosen = getattr(section, rule.chooser)
            if rule.uses(chosen):
                continue
            full_key, value = f"{section_name}.{f.name}", getattr(section, f.name)
            if full_key in given or value != declared_key(f).default:
                found.append(NoEffect(full_key, value, f"{section_name}.{rule.chooser}", chosen,
                                      rule))
    return found


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict (TOML-ready)."""
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as TOML text (written into every run directory)."""
    return tomli_w.dumps(to_dict(config))


def to_run_config(config: Config) -> dict[str, RunConfigValue]:
    """Flatten to Flower's run_config: "section.key" -> scalar (lists become "a,b")."""
    flat: dict[str, RunConfigValue] = {}
    for section_name, values in to_dict(config).items():
        for name, value in values.items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            flat[f"{section_name}.{name}"] = value
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Rebuild a Config from Flower's run_config; keys it lacks keep their defaults."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in run_config.items():
        if dotted.count(".") != 1:
            raise ConfigError(
                f"run_config key {dotted!r} is not allowed: must be section.key (e.g. data.alpha)"
            )
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    return from_dict(nested)


SECTION_HELP = {
    "run": "the run: its name, seed, rounds, run directory, checkpoints",
    "data": "the dataset and how it is split into clients",
    "model": "the model kind (mlp, hf) and what trains (model.transfer)",
    "client": "each client's local training and evaluation",
    "strategy": "the aggregation, client sampling, secure aggregation, update bounds",
    "privacy": "differential privacy (none, local, central) and the empirical audit",
    "faults": "misbehaving clients on purpose: NaN or misshapen updates, crashes, stragglers",
    "attack": "a poisoning attack some clients play (label flip, ALIE, a backdoor, ...)",
    "engine": "the runtime (ray, flower, inprocess, central) and its resources",
    "devices": "simulated devices (none, lognormal, trace) and the virtual clock",
    "tracking": "TensorBoard and MLflow",
}


def allowed_values(full_key: str) -> str:
    """What ``section.key`` takes, as its error message says it ("one of 'iid', ...")."""
    section, name = full_key.split(".")
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    declared = declared_key(field)
    return _allowed_text(declared, declared.type)


def annotated_toml(width: int = 100) -> str:
    """Every key of every section as valid TOML (``fedtune config``): a comment per section,
    then per key its meaning, who uses it and its allowed values, and its default."""
    import textwrap

    lines = ["# fedtune config: every key with its default value. Save it, edit it, run it:",
             "#   fedtune config > my.toml && fedtune run my.toml",
             "# Keys left out of a file keep these defaults; --set section.key=value overrides one."]
    section = ""
    for full_key, default, help_text in describe():
        if full_key.split(".")[0] != section:
            section = full_key.split(".")[0]
            lines += ["", f"[{section}]  # {SECTION_HELP[section]}"]
        comment = f"{help_text}. Allowed: {allowed_values(full_key)}"
        lines += textwrap.wrap(comment, width, initial_indent="# ", subsequent_indent="#   ")
        lines.append(tomli_w.dumps({full_key.split(".")[1]: default}).strip())
    return "\n".join(lines) + "\n"


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key, for `fedtune config` and the docs; a key that only
    some table entries use says which."""
    rows = []
    defaults = to_dict(Config())
    for section_name, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            help_text = declared_key(f).help
            if owners_of(f):
                help_text += f" ({', '.join(owners_of(f))})"
            elif (rule := used_with(f)) is not None:
                help_text += f" (only with {rule.describe()})"
            rows.append((f"{section_name}.{f.name}", defaults[section_name][f.name], help_text))
    return rows
