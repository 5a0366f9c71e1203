"""Multilayer perceptron over fixed-size feature vectors (pixels, hashed bag-of-words)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedtune.data.encode import DenseFeatures, hash_bag_of_words, hashed_features, input_dim
from fedtune.models.build import ModelSpec
from fedtune.models.transfer import TransferSpec

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.data.encode import Encoded
    from fedtune.data.sources import LabelledData


class MLP(nn.Module):
    """Linear -> ReLU (-> Dropout) blocks, then a linear classifier head."""

    def __init__(
        self, input_dim: int, hidden_sizes: Sequence[int], num_labels: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_labels)

    @property
    def base_model(self) -> nn.Module:
        """The body under the head, by the name transformers give a classifier's encoder (what
        ``fedtune.personal.split`` shares and what stays personal read it)."""
        return self.body

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(features))


class MLPKind:
    """``model.kind = "mlp"``: an MLP over hashed bag-of-words (text) or the dataset's own
    feature vectors (pixels)."""

    def encode(self, config: Config, data: LabelledData) -> Encoded:
        if data.is_text:
            return hash_bag_of_words(data, config.model.num_features)
        return DenseFeatures(data.features)

    def spec(self, config: Config, label_names: tuple[str, ...], encoded: Encoded
             ) -> ModelSpec:
        m = config.model
        return ModelSpec(kind="mlp", num_labels=len(label_names), label_names=label_names,
                         dropout=m.dropout, input_dim=input_dim(encoded),
                         hidden_sizes=tuple(m.hidden_sizes), num_features=m.num_features,
                         transfer=TransferSpec(mode=m.transfer))

    def build(self, spec: ModelSpec) -> nn.Module:
        return MLP(spec.input_dim, spec.hidden_sizes, spec.num_labels, spec.dropout)

    def rebuild(self, folder: Path, spec: ModelSpec) -> nn.Module:
        return self.build(spec)

    def encode_texts(self, folder: Path, spec: ModelSpec, texts: Sequence[str] | np.ndarray
                     ) -> dict[str, torch.Tensor]:
        """New inputs for a saved MLP: texts (hashed as in training), or feature vectors."""
        if isinstance(texts, np.ndarray):
            return {"features": torch.as_tensor(texts, dtype=torch.float32)}
        if spec.input_dim != spec.num_features:
            raise ValueError(f"this MLP reads {spec.input_dim} features per example (pixels), "
                             "not texts: pass a 2-D array of features")
        features = hashed_features(list(texts), spec.num_features).toarray()
        return {"features": torch.from_numpy(features)}

    def save_files(self, spec: ModelSpec, folder: Path) -> None:
        """An MLP is its weights and spec alone."""
