"""Build the configured model, exchange its weights as arrays, save and reload it.

``shared_state`` names what travels between server and clients. With full fine-tuning that is
every entry of the state dict; the other transfer modes narrow it to what trains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedtune.config import ModelSection
from fedtune.models.hf import load_hf_classifier, resolve_model_path, uses_mean_pooling
from fedtune.models.mlp import MLP

SAVED_META = "fedtune_model.json"
SAVED_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture (written next to saved weights)."""

    kind: str
    num_labels: int
    label_names: tuple[str, ...]
    path: str = ""
    pooling: str = ""
    dropout: float = 0.0
    input_dim: int = 0
    hidden_sizes: tuple[int, ...] = ()
    num_features: int = 0
    max_length: int = 0


def model_spec(cfg: ModelSection, label_names: tuple[str, ...], input_dim: int) -> ModelSpec:
    """Resolve defaults (model path, pooling) into a concrete spec."""
    if cfg.kind == "mlp":
        return ModelSpec(kind="mlp", num_labels=len(label_names), label_names=label_names,
                         dropout=cfg.dropout, input_dim=input_dim,
                         hidden_sizes=tuple(cfg.hidden_sizes), num_features=cfg.num_features)
    path = resolve_model_path(cfg.path)
    pooling = cfg.pooling
    if pooling == "auto":
        pooling = "mean" if uses_mean_pooling(path) else "cls"
    return ModelSpec(kind="hf", num_labels=len(label_names), label_names=label_names, path=path,
                     pooling=pooling, dropout=cfg.dropout, max_length=cfg.max_length)


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The model with pretrained weights (hf) and a head initialised from ``seed``."""
    torch.manual_seed(seed)
    if spec.kind == "mlp":
        return MLP(spec.input_dim, spec.hidden_sizes, spec.num_labels, spec.dropout)
    return load_hf_classifier(spec.path, spec.num_labels, spec.pooling, spec.dropout)


def shared_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The tensors that travel, as CPU numpy arrays (copies)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def load_shared_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite the travelling tensors in place; names and shapes must match exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    unexpected = sorted(set(arrays) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in own.items():
            value = torch.from_numpy(np.asarray(arrays[name]))
            if value.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(tensor.shape)}")
            tensor.copy_(value)


def save_model(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Weights as safetensors + the spec; for hf also the encoder config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / SAVED_WEIGHTS))
    (folder / SAVED_META).write_text(json.dumps(asdict(spec), indent=2))
    if spec.kind == "hf":
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(spec.path).save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(spec.path).save_pretrained(str(folder))


def load_saved_model(folder: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by ``save_model`` (no pretrained download, no original folder)."""
    folder = Path(folder)
    raw = json.loads((folder / SAVED_META).read_text())
    raw["label_names"] = tuple(raw["label_names"])
    raw["hidden_sizes"] = tuple(raw["hidden_sizes"])
    spec = ModelSpec(**raw)
    if spec.kind == "mlp":
        model: nn.Module = MLP(spec.input_dim, spec.hidden_sizes, spec.num_labels, spec.dropout)
    else:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        from fedtune.models.hf import MeanPoolingClassifier

        config = AutoConfig.from_pretrained(str(folder))
        if spec.pooling == "mean":
            model = MeanPoolingClassifier(AutoModel.from_config(config), spec.num_labels,
                                          spec.dropout)
        else:
            config.num_labels = spec.num_labels
            model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict(load_file(str(folder / SAVED_WEIGHTS)))
    return model.eval(), spec
