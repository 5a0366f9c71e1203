"""Ditto (Li et al. 2021, "Ditto: Fair and robust federated learning through
personalization"): the global model is trained as FedAvg trains it, and each client keeps a
personal model ``v`` of its own, trained on its data with a proximal pull towards the global
model ``w`` it received:

    v <- v - lr * (grad F_k(v) + lambda * (v - w))        (lambda: strategy.ditto_lambda)

for as many local steps as the global update takes. ``v`` starts as the first global model the
client receives and lives in its state; only ``w``'s update is sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import RecordDict
from torch import nn

from fedtune.models.weights import load_shared_state, shared_state, travelling_tensors
from fedtune.personal.base import (
    NDArray,
    Personalisation,
    store_arrays,
    stored_arrays,
    train_part,
)
from fedtune.personal.split import part_names
from fedtune.protocol import PERSONAL_STATE
from fedtune.task import TaskResources
from fedtune.train import TrainPass, TrainResult


class ProximalPull:
    """The gradient of ``lambda / 2 * ||v - w||^2``, added after ``backward``."""

    def __init__(self, weight: float, anchor: dict[str, torch.Tensor]) -> None:
        self.weight = weight
        self.anchor = anchor  # parameter name -> w

    def adjust_gradients(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, param in travelling_tensors(model).items():
                if param.grad is not None and name in self.anchor:
                    param.grad.add_(param - self.anchor[name], alpha=self.weight)


class Ditto(Personalisation):
    """A personal model pulled towards the global one; the global one trained as FedAvg's."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        model = resources.model
        names = part_names(model, "full")
        personal = stored_arrays(state, PERSONAL_STATE) or dict(global_arrays)
        anchor = {name: torch.as_tensor(global_arrays[name]).to(resources.device)
                  for name in names}
        load_shared_state(model, personal)
        train_part(resources, shard, seed, names,
                   objective=ProximalPull(self.config.strategy.ditto_lambda, anchor))
        store_arrays(state, PERSONAL_STATE, shared_state(model, copy=False))
        load_shared_state(model, global_arrays)
        return train_part(resources, shard, seed, names)

    def together_part(self, model: nn.Module) -> list[str]:
        return list(travelling_tensors(model))  # the whole personal model, as ``train`` keeps it

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        # as ``train``: the personal model pulled towards the global one, then the global one
        return [TrainPass(proximal=self.config.strategy.ditto_lambda),
                TrainPass(from_own=False, keeps=False)]

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        return stored_arrays(state, PERSONAL_STATE) or dict(global_arrays)
