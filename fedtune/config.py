"""Typed run configuration.

A run is described by one TOML file with the sections below. Every key has a default, a type
and a check. ``load_config`` reads a file, applies ``--set section.key=value`` overrides and
validates; any user error raises ``ConfigError`` with one line naming the key, the value and
what is allowed, before any work starts.

The same keys flattened with dots ("data.alpha") are Flower's run_config, so
``flwr run . --run-config "data.alpha=0.1"`` and ``fedtune run --set data.alpha=0.1`` mean the
same thing (``to_run_config`` / ``from_run_config``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w

RunConfigValue = bool | int | float | str


class ConfigError(ValueError):
    """A user error in the configuration: one line, names the key, the value, what is allowed."""


def _spec(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its default, its help line and its allowed values."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("rotten_tomatoes", "bbc_news", "digits", "files")
PARTITIONERS = ("iid", "dirichlet", "shards", "quantity_skew", "natural")
MODEL_KINDS = ("hf", "mlp")
TRANSFER_MODES = ("full",)
POOLING = ("auto", "cls", "mean")
OPTIMIZERS = ("adamw", "adam", "sgd")
STRATEGIES = ("fedavg",)
PRIVACY_MODES = ("none",)
BACKENDS = ("ray", "flower", "inprocess")
# strategies whose aggregate is the example-weighted mean of the updates (engine.aggregate_on_actors)
WEIGHTED_MEAN_STRATEGIES = ("fedavg",)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunSection:
    name: str = _spec("fedtune", "run name; the run directory is <output_dir>/<name>-<UTC time>")
    seed: int = _spec(0, "seed for every random choice (data split, init, sampling, batches)", ge=0)
    rounds: int = _spec(3, "number of federated rounds", ge=1)
    output_dir: str = _spec("runs", "folder that receives the run directory")
    dir: str = _spec("", "exact run directory (must be new or empty); '' = under output_dir")
    max_rounds_without_update: int = _spec(
        3, "stop after this many rounds in a row without enough sound client updates", ge=1
    )


@dataclass
class DataSection:
    dataset: str = _spec(
        "rotten_tomatoes", "offline dataset; files = each SuperNode's own CSV/JSONL (deployment)",
        choices=DATASETS,
    )
    num_clients: int = _spec(8, "number of clients (partitions)", ge=1)
    partitioner: str = _spec("natural", "how examples are split over clients", choices=PARTITIONERS)
    alpha: float = _spec(0.5, "Dirichlet concentration over labels (partitioner=dirichlet)", gt=0)
    labels_per_client: int = _spec(2, "labels per client (partitioner=shards)", ge=1)
    quantity_alpha: float = _spec(
        0.5, "Dirichlet concentration over client sizes (partitioner=quantity_skew)", gt=0
    )
    natural_key: str = _spec("", "column that keys natural partitions; '' = dataset's own key")
    min_client_examples: int = _spec(
        4, "smallest partition a client may get (dirichlet, quantity_skew)", ge=2
    )
    test_fraction: float = _spec(0.1, "held-out global test split", gt=0, lt=1)
    local_test_fraction: float = _spec(0.1, "per-client local test split", ge=0, lt=1)
    max_examples: int = _spec(3000, "use a seeded subsample of this many examples; 0 = all",
                              ge=0)
    label_names: list[str] = _spec([], "labels of a files dataset, in index order")
    test_path: str = _spec("", "files dataset: the server's global test file (CSV or JSONL)")
    text_column: str = _spec("text", "files dataset: column / JSON field holding the text")
    label_column: str = _spec("label", "files dataset: column / JSON field holding the label")


@dataclass
class ModelSection:
    kind: str = _spec("hf", "hf = Hugging Face sequence classifier, mlp = multilayer perceptron",
                      choices=MODEL_KINDS)
    path: str = _spec("", "local path of a Hugging Face model; '' = bundled all-MiniLM-L6-v2")
    transfer: str = _spec("full", "what trains: full fine-tune", choices=TRANSFER_MODES)
    pooling: str = _spec(
        "auto", "sentence representation for hf models; auto = the model's own pooling config",
        choices=POOLING,
    )
    max_length: int = _spec(48, "max tokens per text (hf); batches are padded dynamically", ge=8)
    hidden_sizes: list[int] = _spec([128], "hidden layer sizes of the MLP")
    num_features: int = _spec(4096, "hashed bag-of-words features for the MLP on text", ge=16)
    dropout: float = _spec(0.1, "dropout before the classifier head", ge=0, lt=1)


@dataclass
class ClientSection:
    optimizer: str = _spec("adamw", "local optimizer", choices=OPTIMIZERS)
    lr: float = _spec(1e-4, "local learning rate", gt=0)
    weight_decay: float = _spec(0.0, "weight decay", ge=0)
    momentum: float = _spec(0.0, "SGD momentum", ge=0, lt=1)
    local_epochs: int = _spec(1, "local epochs per round (when local_steps = 0)", ge=1)
    local_steps: int = _spec(8, "local optimizer steps per round; 0 = use local_epochs", ge=0)
    batch_size: int = _spec(16, "local training batch size", ge=1)
    eval_batch_size: int = _spec(128, "evaluation batch size", ge=1)
    max_grad_norm: float = _spec(0.0, "clip the gradient norm per step; 0 = off", ge=0)
    device: str = _spec("auto", "where clients compute; auto = cuda when present", choices=DEVICES)


@dataclass
class StrategySection:
    name: str = _spec("fedavg", "aggregation strategy", choices=STRATEGIES)
    fraction_train: float = _spec(0.25, "fraction of clients sampled for training each round",
                                  gt=0, le=1)
    fraction_evaluate: float = _spec(
        0.25, "fraction of clients sampled for federated evaluation; 0 = none", ge=0, le=1
    )
    min_train_clients: int = _spec(
        1, "fewest clients sampled for training each round (Flower's min_train_nodes)", ge=1
    )
    round_timeout_s: float = _spec(3600.0, "longest wait for the replies of one round", gt=0)


@dataclass
class PrivacySection:
    mode: str = _spec("none", "differential privacy", choices=PRIVACY_MODES)


@dataclass
class EngineSection:
    backend: str = _spec(
        "ray", "ray = fedtune's engine (persistent Ray actors), flower = Flower's Ray simulation, "
        "inprocess = no Ray (debug)", choices=BACKENDS,
    )
    client_cpus: float = _spec(1.0, "CPU cores reserved per simulated client", gt=0)
    client_gpus: float = _spec(0.0, "GPU fraction per simulated client (0.25 = 4 share one)",
                               ge=0, le=1)
    node_wait_s: float = _spec(
        60.0, "how long the server waits for all clients (ray: its actors) to start", gt=0
    )
    num_actors: int = _spec(
        0, "ray engine: client actors; 0 = as many as the cluster's CPUs/GPUs allow", ge=0
    )
    client_timeout_s: float = _spec(
        600.0, "ray engine: a client not done after this long is stopped and reported timeout",
        gt=0,
    )
    ray_address: str = _spec(
        "", "ray engine: address of a running Ray cluster to join ('' = start one here)"
    )
    aggregate_on_actors: bool = _spec(
        False, "ray engine: actors sum FedAvg's weighted updates and send one partial sum each",
    )


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    client: ClientSection = field(default_factory=ClientSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    engine: EngineSection = field(default_factory=EngineSection)


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "client": ClientSection,
    "strategy": StrategySection,
    "privacy": PrivacySection,
    "engine": EngineSection,
}


@lru_cache(maxsize=None)
def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _allowed_text(f: dataclasses.Field[Any], kind: Any) -> str:
    meta = f.metadata
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    bounds = []
    for key, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta[key] is not None:
            bounds.append(f"{sign} {meta[key]:g}")
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind,
        "a list of names without commas" if typing.get_args(kind) == (str,)
        else "a list of positive integers",
    )
    return name + (" " + " and ".join(bounds) if bounds else "")


def _coerce(key: str, value: Any, f: dataclasses.Field[Any], kind: Any) -> Any:
    """Convert one value to the field's type and check it; raise ConfigError naming the key."""

    def bad() -> ConfigError:
        return ConfigError(f"{key} = {value!r} is not allowed: must be {_allowed_text(f, kind)}")

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
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value_list):
            raise bad()
        out = list(value_list)
    meta = f.metadata
    if meta["choices"] is not None and out not in meta["choices"]:
        raise bad()
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        checks = (
            ("gt", lambda b: out > b),
            ("ge", lambda b: out >= b),
            ("lt", lambda b: out < b),
            ("le", lambda b: out <= b),
        )
        for name, ok in checks:
            if meta[name] is not None and not ok(meta[name]):
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
    types = _field_types(section_cls)
    kwargs = {}
    for key, value in values.items():
        full_key = f"{section_name}.{key}"
        if key not in fields:
            raise ConfigError(
                f"{full_key} is not a config key: [{section_name}] allows "
                + ", ".join(fields)
            )
        kwargs[key] = _coerce(full_key, value, fields[key], types[key])
    return section_cls(**kwargs)


def check_consistency(config: Config) -> None:
    """Checks that involve more than one key or the file system (no data needed)."""
    if config.model.path:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path = {config.model.path!r} is not allowed: must be a folder with a "
                "Hugging Face config.json (no hub downloads)"
            )
    if config.model.kind == "mlp" and config.model.path:
        raise ConfigError(
            f"model.path = {config.model.path!r} is not allowed with model.kind = 'mlp': "
            "must be '' (the MLP is built from model.hidden_sizes)"
        )
    if config.model.kind == "hf" and config.data.dataset == "digits":
        raise ConfigError(
            "data.dataset = 'digits' is not allowed with model.kind = 'hf': must be a text "
            "dataset (rotten_tomatoes, bbc_news), or set model.kind = 'mlp'"
        )
    if config.data.dataset == "files":
        if len(config.data.label_names) < 2:
            raise ConfigError(
                f"data.label_names = {config.data.label_names!r} is not allowed with "
                "data.dataset = 'files': must name at least 2 labels, e.g. [\"neg\", \"pos\"]"
            )
        if not config.data.test_path:
            raise ConfigError("data.test_path = '' is not allowed with data.dataset = 'files': "
                              "must be the server's global test file (CSV or JSONL)")
    ray_only = (("ray_address", config.engine.ray_address, ""),
                ("aggregate_on_actors", config.engine.aggregate_on_actors, False))
    for key, value, off in ray_only:
        if value != off and config.engine.backend != "ray":
            raise ConfigError(
                f"engine.{key} = {value!r} is not allowed with engine.backend = "
                f"{config.engine.backend!r}: must be {off!r} (only the ray engine has it)"
            )
    if (config.engine.aggregate_on_actors
            and config.strategy.name not in WEIGHTED_MEAN_STRATEGIES):
        raise ConfigError(
            f"engine.aggregate_on_actors = true is not allowed with strategy.name = "
            f"{config.strategy.name!r}: must be one of {', '.join(WEIGHTED_MEAN_STRATEGIES)} "
            "(a plain example-weighted mean)"
        )
    if config.strategy.min_train_clients > config.data.num_clients:
        raise ConfigError(
            f"strategy.min_train_clients = {config.strategy.min_train_clients} is not allowed: "
            f"must be <= data.num_clients = {config.data.num_clients}"
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
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config (or the defaults when path is None) and apply --set overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        raw[section][key] = value
    return from_dict(raw)


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
        for key, value in values.items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            flat[f"{section_name}.{key}"] = value
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


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key, for `fedtune config` and the docs."""
    rows = []
    defaults = to_dict(Config())
    for section_name, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            rows.append((f"{section_name}.{f.name}", defaults[section_name][f.name],
                         f.metadata["help"]))
    return rows
