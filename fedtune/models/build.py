"""The model of a run: its spec, building it, saving and reloading it.

What differs between model kinds (how inputs are encoded, how the module is built, what a
saved folder holds besides the weights) is the kind's implementation, found through
``fedtune.tables.model_kinds.MODEL_KINDS``; this module is the same for every kind. What travels
between server and clients is ``fedtune.models.weights``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from fedtune.models.transfer import TransferSpec, plain_model
from fedtune.tables.model_kinds import MODEL_KINDS

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.data.encode import Encoded
    from fedtune.data.sources import LabelledData

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
    features: bool = False  # trains its head on cached pooled features (saved whole)


class ModelKind(Protocol):
    """What a model kind implements (the ``implementation`` of its ``MODEL_KINDS`` entry)."""

    def encode(self, config: Config, data: LabelledData) -> Encoded:
        """The model inputs of every example (token ids, features), once per process."""

    def spec(self, config: Config, label_names: tuple[str, ...], encoded: Encoded
             ) -> ModelSpec:
        """The concrete spec (defaults resolved) of the configured model."""

    def build(self, spec: ModelSpec) -> nn.Module:
        """A freshly initialised model, ready for its transfer mode (seeded by the caller)."""

    def rebuild(self, folder: Path, spec: ModelSpec) -> nn.Module:
        """The architecture of a saved model, from its folder alone (weights loaded after)."""

    def save_files(self, spec: ModelSpec, folder: Path) -> None:
        """What a saved model needs besides weights and spec (configs, tokenizer)."""

    def encode_texts(self, folder: Path, spec: ModelSpec, texts: Any) -> dict[str, torch.Tensor]:
        """New inputs (texts; an MLP on pixels: feature vectors) as one batch for a model
        saved in ``folder``, encoded as in training."""


def model_kind(kind: str) -> ModelKind:
    return MODEL_KINDS[kind].load()()


def model_spec(config: Config, label_names: tuple[str, ...], encoded: Encoded | None
               ) -> ModelSpec:
    """The spec of the configured model for these labels and inputs (``encoded``: what the
    kind's ``encode`` made; Hugging Face models do not need it)."""
    return model_kind(config.model.kind).spec(config, label_names, encoded)


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The model, ready for its transfer mode: pretrained weights where its kind has them,
    random weights from ``seed`` for the rest."""
    torch.manual_seed(seed)
    return model_kind(spec.kind).build(spec)


def save_model(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Weights as safetensors + the spec + the kind's files (for hf the encoder config and
    tokenizer). A LoRA model is saved merged, so ``load_saved_model`` gives a plain model."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in plain_model(model).state_dict().items()}
    # bytes written as any other file, with its permissions (save_file makes it 0600, so a
    # colleague could not read the model)
    (folder / SAVED_WEIGHTS).write_bytes(save(state))
    (folder / SAVED_META).write_text(json.dumps(asdict(spec), indent=2))
    model_kind(spec.kind).save_files(spec, folder)


def load_saved_model(folder: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by ``save_model`` (no pretrained download, no original folder)."""
    folder = Path(folder)
    raw: dict[str, Any] = json.loads((folder / SAVED_META).read_text())
    raw["label_names"] = tuple(raw["label_names"])
    raw["hidden_sizes"] = tuple(raw["hidden_sizes"])
    transfer = raw.get("transfer", {})
    raw["transfer"] = TransferSpec(**{**transfer, "lora_targets": tuple(
        transfer.get("lora_targets", TransferSpec.lora_targets))})
    spec = ModelSpec(**raw)
    model = model_kind(spec.kind).rebuild(folder, spec)
    model.load_state_dict(load_file(str(folder / SAVED_WEIGHTS)))
    return model.eval(), spec


@dataclass
class SavedModel:
    """A saved model, ready to classify new inputs (texts, or feature vectors for an MLP on
    pixels) the way it was trained to read them."""

    model: nn.Module
    spec: ModelSpec
    folder: Path

    def logits(self, inputs: Any) -> torch.Tensor:
        batch = model_kind(self.spec.kind).encode_texts(self.folder, self.spec, inputs)
        with torch.no_grad():
            out = self.model(**batch)
        return out if isinstance(out, torch.Tensor) else out.logits

    def predict_proba(self, inputs: Any) -> np.ndarray:
        """One row of class probabilities per input, columns in ``spec.label_names`` order."""
        return torch.softmax(self.logits(inputs).float(), dim=-1).numpy()

    def predict(self, inputs: Any) -> list[str]:
        """The predicted label name of each input."""
        return [self.spec.label_names[i] for i in self.predict_proba(inputs).argmax(axis=1)]


def load_predictor(folder: str | Path) -> SavedModel:
    """``load_saved_model`` with ``predict`` / ``predict_proba`` on new inputs."""
    model, spec = load_saved_model(folder)
    return SavedModel(model, spec, Path(folder))
