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
TRANSFER_MODES = ("scratch", "full", "frozen", "top_k", "lora")
MLP_TRANSFER_MODES = ("scratch", "full")
POOLING = ("auto", "cls", "mean")
OPTIMIZERS = ("adamw", "adam", "sgd")
FLOWER_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                     "fedtrimmedavg", "fedmedian", "krum", "multikrum")
OWN_STRATEGIES = ("scaffold", "fednova", "feddyn", "rfa")  # in strategies/
STRATEGIES = FLOWER_STRATEGIES + OWN_STRATEGIES
SGD_ONLY_STRATEGIES = ("scaffold", "fednova")
# strategies whose clients change the local objective (fedtune.client_algorithms)
CLIENT_OBJECTIVE_STRATEGIES = ("fedprox", "scaffold", "fednova", "feddyn")
PRIVACY_MODES = ("none", "local", "central")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks")
BACKENDS = ("ray", "flower", "inprocess")
# strategies whose aggregate is the example-weighted mean of the updates (engine.aggregate_on_actors)
WEIGHTED_MEAN_STRATEGIES = ("fedavg",)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
STRAGGLER_DELAYS = ("constant", "exponential")


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
    checkpoint_every: int = _spec(
        1, "write <run dir>/checkpoint/ every this many rounds (also on Ctrl-C); 0 = only on "
        "Ctrl-C or failure", ge=0
    )
    resume: bool = _spec(False, "continue the run in run.dir from its checkpoint "
                                "(`fedtune run --resume RUN_DIR` sets it)")


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
    transfer: str = _spec(
        "full", "what trains (and travels): scratch = random init, all; full = pretrained, all; "
        "frozen = head only; top_k = last top_k_layers encoder layers + head; lora = LoRA "
        "adapters + head", choices=TRANSFER_MODES,
    )
    top_k_layers: int = _spec(2, "encoder layers that train with transfer = top_k (the last)",
                              ge=1)
    lora_r: int = _spec(8, "LoRA rank (transfer = lora)", ge=1)
    lora_alpha: float = _spec(16.0, "LoRA alpha: adapter updates are scaled by alpha / r", gt=0)
    lora_dropout: float = _spec(0.1, "dropout on the LoRA adapters' input", ge=0, lt=1)
    lora_targets: str = _spec(
        "query,value", "comma-separated names of the linear layers that get LoRA adapters "
        "(peft target_modules)",
    )
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
    precision: str = _spec(
        "fp32", "local training autocast: fp32 = off, bf16, fp16 (CUDA only, with a gradient "
        "scaler)", choices=PRECISIONS,
    )


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
    # Hyper-parameters: each applies to the strategies named in its help and is ignored by the
    # others (so one sweep file can set them all while its grid varies strategy.name).
    proximal_mu: float = _spec(0.01, "proximal weight mu (fedprox; Li et al. 2020 search "
                                     "0.001-1)", ge=0)
    server_lr: float = _spec(1.0, "server learning rate (fedavgm, scaffold)", gt=0)
    server_momentum: float = _spec(0.9, "server momentum (fedavgm; Hsu et al. 2019)", ge=0, lt=1)
    fedopt_eta: float = _spec(0.01, "server learning rate eta (fedadam, fedyogi, fedadagrad; "
                                    "Reddi et al. 2021)", gt=0)
    fedopt_beta_1: float = _spec(0.9, "first-moment decay (fedadam, fedyogi)", ge=0, lt=1)
    fedopt_beta_2: float = _spec(0.99, "second-moment decay (fedadam, fedyogi)", ge=0, lt=1)
    fedopt_tau: float = _spec(1e-3, "adaptivity tau (fedadam, fedyogi, fedadagrad)", gt=0)
    trim_beta: float = _spec(0.2, "fraction cut from each tail per coordinate (fedtrimmedavg)",
                             ge=0, lt=0.5)
    num_malicious: int = _spec(0, "assumed Byzantine clients f per round (krum, multikrum)",
                               ge=0)
    multikrum_select: int = _spec(
        0, "updates Multi-Krum averages; 0 = clients per round - num_malicious (multikrum)", ge=0
    )
    feddyn_alpha: float = _spec(0.01, "dynamic regulariser weight alpha (feddyn; Acar et al. "
                                      "2021)", gt=0)
    rfa_iterations: int = _spec(4, "smoothed Weiszfeld steps after the mean (rfa; Pillutla "
                                   "et al. 2022)", ge=0)
    rfa_smoothing: float = _spec(1e-6, "Weiszfeld smoothing nu (rfa)", gt=0)


@dataclass
class PrivacySection:
    mode: str = _spec(
        "none", "differential privacy: local = DP-SGD on every client (per example, Opacus), "
        "central = DP-FedAvg at the server (per client); in central mode each client is "
        "sampled with probability strategy.fraction_train", choices=PRIVACY_MODES,
    )
    target_epsilon: float = _spec(
        0.0, "ε the run may spend (local: per client, central: for the run); inf = clip "
        "without noise; 0 = not set (then give noise_multiplier)", ge=0,
    )
    delta: float = _spec(1e-5, "δ of the (ε, δ) guarantee; must be < 1/N (local: N = examples "
                               "of the smallest client, central: N = data.num_clients)",
                         gt=0, lt=1)
    noise_multiplier: float = _spec(
        0.0, "Gaussian noise std / clipping bound; 0 = derived from target_epsilon", ge=0
    )
    accountant: str = _spec("rdp", "privacy accountant (opacus.accountants)",
                            choices=ACCOUNTANTS)
    max_grad_norm: float = _spec(1.0, "local: clipping bound of every example's gradient", gt=0)
    grad_sample_mode: str = _spec(
        "auto", "local: ghost = ghost clipping (no per-example gradients kept), hooks = "
                "per-example gradients; auto = ghost unless the model ties parameters",
        choices=GRAD_SAMPLE_MODES,
    )
    client_rounds: int = _spec(
        0, "local: rounds each client plans to train; its noise makes ε reach target_epsilon "
           "after client_rounds x its steps per round; 0 = run.rounds", ge=0,
    )
    clip_norm: float = _spec(1.0, "central: clipping bound of every client's update (the "
                                  "starting bound when adaptive)", gt=0)
    adaptive_clipping: bool = _spec(
        False, "central: move the bound towards a quantile of update norms (Andrew et al. 2021)"
    )
    target_quantile: float = _spec(0.5, "central, adaptive: share of updates left unclipped",
                                   gt=0, lt=1)
    clip_lr: float = _spec(0.2, "central, adaptive: geometric step size of the bound", gt=0)
    clipped_count_stddev: float = _spec(
        0.0, "central, adaptive: noise std of the unclipped count; 0 = expected cohort / 20",
        ge=0,
    )


@dataclass
class FaultsSection:
    scale_fraction: float = _spec(
        0.0, "fraction of clients (drawn once from run.seed) whose every update is scaled",
        ge=0, le=1
    )
    scale_factor: float = _spec(-10.0, "what a scaling client multiplies its update by")
    nan_fraction: float = _spec(
        0.0, "fraction of clients (drawn once) whose every update is NaN", ge=0, le=1
    )
    wrong_shape_fraction: float = _spec(
        0.0, "fraction of clients (drawn once) whose every update has a tensor of the wrong "
        "shape", ge=0, le=1
    )
    crash_probability: float = _spec(
        0.0, "probability that a client crashes each time it is asked to train", ge=0, le=1
    )
    straggler_fraction: float = _spec(
        0.0, "fraction of clients (drawn once) that wait before training", ge=0, le=1
    )
    straggler_delay: str = _spec("constant", "distribution of a straggler's wait",
                                 choices=STRAGGLER_DELAYS)
    straggler_delay_s: float = _spec(0.0, "mean of a straggler's wait in seconds", ge=0)


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
    faults: FaultsSection = field(default_factory=FaultsSection)
    engine: EngineSection = field(default_factory=EngineSection)


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "client": ClientSection,
    "strategy": StrategySection,
    "privacy": PrivacySection,
    "faults": FaultsSection,
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


def lora_target_names(text: str) -> tuple[str, ...]:
    """``model.lora_targets`` ("query,value") as a tuple of module names."""
    return tuple(name for name in text.replace(" ", "").split(",") if name)


def check_consistency(config: Config) -> None:
    """Checks that involve more than one key or the file system (no data needed)."""
    if not lora_target_names(config.model.lora_targets):
        raise ConfigError(
            f"model.lora_targets = {config.model.lora_targets!r} is not allowed: must name at "
            "least one linear layer, e.g. 'query,value'"
        )
    if config.model.kind == "mlp" and config.model.transfer not in MLP_TRANSFER_MODES:
        raise ConfigError(
            f"model.transfer = {config.model.transfer!r} is not allowed with model.kind = "
            "'mlp': must be 'scratch' or 'full'"
        )
    if config.client.precision == "fp16" and config.client.device == "cpu":
        raise ConfigError(
            "client.precision = 'fp16' is not allowed with client.device = 'cpu': must be "
            "'fp32' or 'bf16' (fp16 autocast needs CUDA)"
        )
    if (config.client.device == "cuda" and config.engine.backend != "inprocess"
            and config.engine.client_gpus == 0):
        raise ConfigError(
            "client.device = 'cuda' is not allowed with engine.client_gpus = 0: Ray gives such "
            "clients no GPU; set engine.client_gpus > 0 (0.125 = 8 clients share one GPU)"
        )
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
    check_privacy(config)
    ray_only = (("ray_address", config.engine.ray_address, ""),
                ("aggregate_on_actors", config.engine.aggregate_on_actors, False))
    for key, value, off in ray_only:
        if value != off and config.engine.backend != "ray":
            raise ConfigError(
                f"engine.{key} = {value!r} is not allowed with engine.backend = "
                f"{config.engine.backend!r}: must be {off!r} (only the ray engine has it)"
            )
    if config.engine.aggregate_on_actors and (
            config.strategy.name not in WEIGHTED_MEAN_STRATEGIES
            or config.privacy.mode == "central"):
        raise ConfigError(
            f"engine.aggregate_on_actors = true is not allowed with strategy.name = "
            f"{config.strategy.name!r}: must be one of {', '.join(WEIGHTED_MEAN_STRATEGIES)} "
            "(a plain example-weighted mean, without central DP)"
        )
    if config.strategy.min_train_clients > config.data.num_clients:
        raise ConfigError(
            f"strategy.min_train_clients = {config.strategy.min_train_clients} is not allowed: "
            f"must be <= data.num_clients = {config.data.num_clients}"
        )
    _check_strategy(config)
    _check_faults(config)


def clients_per_round(config: Config) -> int:
    """How many clients Flower's sampling picks for training each round."""
    s = config.strategy
    return max(int(config.data.num_clients * s.fraction_train), s.min_train_clients)


def _check_strategy(config: Config) -> None:
    s = config.strategy
    if s.name in SGD_ONLY_STRATEGIES and config.client.optimizer != "sgd":
        raise ConfigError(
            f"client.optimizer = {config.client.optimizer!r} is not allowed with strategy.name "
            f"= {s.name!r}: must be 'sgd' (its update rule assumes local SGD steps)"
        )
    sampled = clients_per_round(config)
    if s.name in ("krum", "multikrum") and s.num_malicious >= sampled:
        raise ConfigError(
            f"strategy.num_malicious = {s.num_malicious} is not allowed: must be < the "
            f"{sampled} clients sampled per round"
        )
    if s.name == "multikrum" and s.multikrum_select > sampled:
        raise ConfigError(
            f"strategy.multikrum_select = {s.multikrum_select} is not allowed: must be <= the "
            f"{sampled} clients sampled per round (0 = {sampled} - num_malicious)"
        )


def _check_faults(config: Config) -> None:
    f, n = config.faults, config.data.num_clients
    for key in ("scale_fraction", "nan_fraction", "wrong_shape_fraction", "straggler_fraction"):
        fraction = getattr(f, key)
        if 0 < fraction * n < 0.5:  # rounds to no client at all
            raise ConfigError(
                f"faults.{key} = {fraction:g} is not allowed with data.num_clients = {n}: "
                f"must pick at least one client (>= {0.5 / n:g}) or be 0"
            )


def check_privacy(config: Config) -> None:
    """Privacy keys that only make sense together (data-dependent δ checks: task.py)."""
    p = config.privacy
    if p.mode == "none":
        return
    if p.target_epsilon and p.noise_multiplier:
        raise ConfigError(
            f"privacy.noise_multiplier = {p.noise_multiplier:g} is not allowed with "
            f"privacy.target_epsilon = {p.target_epsilon:g}: set one of them (the other = 0)"
        )
    if not p.target_epsilon and not p.noise_multiplier:
        raise ConfigError(
            f"privacy.target_epsilon = 0 is not allowed with privacy.mode = {p.mode!r}: must "
            "be > 0 (inf = no noise), or set privacy.noise_multiplier > 0"
        )
    if p.mode == "central" and p.delta >= 1 / config.data.num_clients:
        raise ConfigError(
            f"privacy.delta = {p.delta:g} is not allowed: must be < 1/data.num_clients = "
            f"{1 / config.data.num_clients:g} (user-level DP protects each client)"
        )
    if p.mode == "central" and config.strategy.name != "fedavg":
        raise ConfigError(
            f"strategy.name = {config.strategy.name!r} is not allowed with privacy.mode = "
            "'central': must be 'fedavg' (DP-FedAvg replaces the aggregation)"
        )
    if p.mode == "local" and config.strategy.name in CLIENT_OBJECTIVE_STRATEGIES:
        raise ConfigError(
            f"strategy.name = {config.strategy.name!r} is not allowed with privacy.mode = "
            "'local': must be one without a client-side objective (DP-SGD trains plain "
            f"cross-entropy), not {', '.join(CLIENT_OBJECTIVE_STRATEGIES)}"
        )
    if p.mode == "local" and config.client.max_grad_norm:
        raise ConfigError(
            f"client.max_grad_norm = {config.client.max_grad_norm:g} is not allowed with "
            "privacy.mode = 'local': must be 0 (privacy.max_grad_norm clips every example)"
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
    if not file.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config (or the defaults when path is None) and apply --set overrides."""
    raw: dict[str, Any] = {} if path is None else read_toml(path, "config file")
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
