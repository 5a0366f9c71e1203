"""Build the configured model, exchange its weights as arrays, save and reload it.

``shared_state`` holds what travels between server and clients: the trainable parameters and
the declared shared buffers (``fedtune.models.transfer.travelling_names``). With full
fine-tuning that is every parameter; frozen, top-k and LoRA modes narrow it to what trains.
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

from fedtune.config import ModelSection, lora_target_names
from fedtune.models.hf import (
    classifier_from_config,
    load_hf_classifier,
    resolve_model_path,
    uses_mean_pooling,
)
from fedtune.models.mlp import MLP
from fedtune.models.transfer import TransferSpec, apply_transfer, plain_model, travelling_names

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
    transfer: TransferSpec = TransferSpec()  # how it trains; saved weights are always plain


def transfer_spec(cfg: ModelSection) -> TransferSpec:
    return TransferSpec(mode=cfg.transfer, top_k_layers=cfg.top_k_layers, lora_r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        lora_targets=lora_target_names(cfg.lora_targets))


def model_spec(cfg: ModelSection, label_names: tuple[str, ...], input_dim: int) -> ModelSpec:
    """Resolve defaults (model path, pooling) into a concrete spec."""
    if cfg.kind == "mlp":
        return ModelSpec(kind="mlp", num_labels=len(label_names), label_names=label_names,
                         dropout=cfg.dropout, input_dim=input_dim,
                         hidden_sizes=tuple(cfg.hidden_sizes), num_features=cfg.num_features,
                         transfer=transfer_spec(cfg))
    path = resolve_model_path(cfg.path)
    pooling = cfg.pooling
    if pooling == "auto":
        pooling = "mean" if uses_mean_pooling(path) else "cls"
    return ModelSpec(kind="hf", num_labels=len(label_names), label_names=label_names, path=path,
                     pooling=pooling, dropout=cfg.dropout, max_length=cfg.max_length,
                     transfer=transfer_spec(cfg))


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The model, ready for its transfer mode: pretrained weights (hf, unless scratch), random
    weights from ``seed`` for the rest, frozen or LoRA-wrapped as ``spec.transfer`` says."""
    torch.manual_seed(seed)
    if spec.kind == "mlp":
        return MLP(spec.input_dim, spec.hidden_sizes, spec.num_labels, spec.dropout)
    model = load_hf_classifier(spec.path, spec.num_labels, spec.pooling, spec.dropout,
                               pretrained=spec.transfer.pretrained)
    return apply_transfer(model, spec.transfer)


def _travelling_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: tensors[name] for name in travelling_names(model)}


def shared_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The tensors that travel (``travelling_names``), as CPU numpy arrays (copies)."""
    return {name: t.detach().cpu().numpy().copy()
            for name, t in _travelling_tensors(model).items()}


def load_shared_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite the travelling tensors in place; names and shapes must match exactly."""
    own = _travelling_tensors(model)
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
    """Weights as safetensors + the spec; for hf also the encoder config and tokenizer.

    A LoRA model is saved merged, so ``load_saved_model`` gives a plain model."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in plain_model(model).state_dict().items()}
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
    transfer = raw.get("transfer", {})
    raw["transfer"] = TransferSpec(**{**transfer, "lora_targets": tuple(
        transfer.get("lora_targets", TransferSpec.lora_targets))})
    spec = ModelSpec(**raw)
    if spec.kind == "mlp":
        model: nn.Module = MLP(spec.input_dim, spec.hidden_sizes, spec.num_labels, spec.dropout)
    else:
        from transformers import AutoConfig

        model = classifier_from_config(AutoConfig.from_pretrained(str(folder)), spec.num_labels,
                                       spec.pooling, spec.dropout)
    model.load_state_dict(load_file(str(folder / SAVED_WEIGHTS)))
    return model.eval(), spec
