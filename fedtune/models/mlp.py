"""Multilayer perceptron over fixed-size feature vectors (pixels, hashed bag-of-words)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(features))
