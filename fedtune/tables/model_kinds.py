"""Every kind of model fedtune trains, one entry each (``model.kind``).

An entry declares the ``[model]`` keys the kind owns, the transfer modes it supports and its
config checks, and names its implementation: a class with ``encode`` (data -> model inputs),
``spec`` (config -> ``ModelSpec``), ``build`` (spec -> ``nn.Module``), ``rebuild`` (a saved
folder -> module) and ``save_files`` (what a saved model needs besides its weights). Adding a
model kind: write that class (``fedtune/models/<kind>.py``) and add one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key
from fedtune.tables.datasets import DATASETS

if TYPE_CHECKING:
    from fedtune.config import Config

TRANSFER_MODES = ("scratch", "full", "frozen", "top_k", "lora")
POOLING = ("auto", "cls", "mean")


@dataclass(frozen=True)
class ModelKindEntry(Entry):
    transfer_modes: tuple[str, ...] = ("scratch", "full")
    check: Callable[[Config], None] | None = None
    # its clients may train together as stacked copies (engine.vectorise_clients; a kind
    # whose models are not may still be trained so on precomputed features)
    vectorisable: bool = False
    loading: str = ""  # what the user is told while its inputs are prepared (after "loading")


def lora_target_names(text: str) -> tuple[str, ...]:
    """``model.lora_targets`` ("query,value") as a tuple of module names."""
    return tuple(name for name in text.replace(" ", "").split(",") if name)


def _check_hf(config: Config) -> None:
    if not lora_target_names(config.model.lora_targets):
        raise ConfigError(
            f"model.lora_targets = {config.model.lora_targets!r} is not allowed: must name at "
            "least one linear layer, e.g. 'query,value'"
        )
    if config.model.path:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path = {config.model.path!r} is not allowed: must be a folder with a "
                "Hugging Face config.json (no hub downloads)"
            )
    if not DATASETS[config.data.dataset].text:
        texts = ", ".join(name for name, entry in DATASETS.items() if entry.text)
        raise ConfigError(
            f"data.dataset = {config.data.dataset!r} is not allowed with model.kind = 'hf': "
            f"must be a text dataset ({texts}), or set model.kind = 'mlp'"
        )


MAX_MLP_PARAMETERS = 500_000_000  # 2 GB per float32 copy; a run holds several copies
FEATURES_BOUND = 1024  # the widest feature vector of a non-text dataset (digits: 64)


def _check_mlp(config: Config) -> None:
    """Refuse, before anything is allocated, an MLP too large to build: its parameter count
    with the widest input it can have (``model.num_features`` hashed features on text)."""
    m = config.model
    if m.path:
        raise ConfigError(
            f"model.path = {m.path!r} is not allowed with model.kind = 'mlp': must be '' (the "
            "MLP is built from model.hidden_sizes)"
        )
    text = DATASETS[config.data.dataset].text
    widths = [m.num_features if text else FEATURES_BOUND, *m.hidden_sizes]
    parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
    parameters += (widths[-1] + 1) * 1000  # a head of up to 1,000 labels
    if parameters > MAX_MLP_PARAMETERS:
        inputs = f" with model.num_features = {m.num_features}" if text else ""
        raise ConfigError(
            f"model.hidden_sizes = {list(m.hidden_sizes)} is not allowed{inputs}: about "
            f"{parameters:,} parameters, must stay below {MAX_MLP_PARAMETERS:,}"
        )


MODEL_KINDS: dict[str, ModelKindEntry] = {
    "hf": ModelKindEntry(
        "Hugging Face sequence classifier from a local folder",
        keys={
            "path": Key("", "local path of a Hugging Face model; '' = bundled "
                            "all-MiniLM-L6-v2"),
            "top_k_layers": Key(2, "encoder layers that train with transfer = top_k (the last)",
                                ge=1),
            "lora_r": Key(8, "LoRA rank (transfer = lora)", ge=1),
            "lora_alpha": Key(16.0, "LoRA alpha: adapter updates are scaled by alpha / r",
                              gt=0),
            "lora_dropout": Key(0.1, "dropout on the LoRA adapters' input", ge=0, lt=1),
            "lora_targets": Key("query,value", "comma-separated names of the linear layers "
                                               "that get LoRA adapters (peft target_modules)"),
            "pooling": Key("auto", "sentence representation; auto = the model's own pooling "
                                   "config", choices=POOLING),
            "max_length": Key(48, "max tokens per text; batches are padded dynamically",
                              ge=8),
            "feature_cache": Key(True, "transfer = frozen: compute the frozen encoder's pooled "
                                       "output once per text (cached on disk) and train only "
                                       "the head on it; false = run the encoder every step"),
        },
        implementation="fedtune.models.hf:HFKind", transfer_modes=TRANSFER_MODES,
        check=_check_hf, loading="tokenising once, cached after"),
    "mlp": ModelKindEntry(
        "multilayer perceptron over fixed-size features (pixels, hashed bag-of-words)",
        keys={
            "hidden_sizes": Key([128], "hidden layer sizes", kind=list[int]),
            "num_features": Key(4096, "hashed bag-of-words features on text", ge=16,
                                le=2**24),
        },
        implementation="fedtune.models.mlp:MLPKind", check=_check_mlp, vectorisable=True),
}


def check_model(config: Config) -> None:
    """The chosen model kind's transfer modes and checks."""
    entry = MODEL_KINDS[config.model.kind]
    if config.model.transfer not in entry.transfer_modes:
        raise ConfigError(
            f"model.transfer = {config.model.transfer!r} is not allowed with model.kind = "
            f"{config.model.kind!r}: must be "
            + " or ".join(repr(m) for m in entry.transfer_modes)
        )
    if entry.check is not None:
        entry.check(config)
