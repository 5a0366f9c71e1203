"""FedPer (Arivazhagan et al. 2019, "Federated learning with personalization layers"): the
body is shared, the head is personal. Each round a client puts its own head on the global body,
trains both together, keeps the head in its state and sends the body (its reply's head is the
global head it received: the personal head is never released).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedtune.models.weights import load_shared_state, travelling_tensors
from fedtune.personal.base import (
    NDArray,
    Personalisation,
    store_arrays,
    stored_arrays,
    train_part,
    with_part,
)
from fedtune.personal.split import head_names, part_names
from fedtune.protocol import PERSONAL_STATE
from fedtune.task import TaskResources
from fedtune.train import TrainResult


def own_head_model(state: RecordDict | None, global_arrays: Mapping[str, NDArray]
                   ) -> dict[str, NDArray]:
    """The global model with the client's own part (the global one before its first round)."""
    return with_part(global_arrays, stored_arrays(state, PERSONAL_STATE))


def keep_personal_send_shared(resources: TaskResources, state: RecordDict,
                              global_arrays: Mapping[str, NDArray], personal: list[str]) -> None:
    """Store the trained ``personal`` tensors, and put the global ones back for the reply (only
    those tensors are read and written: a small client's step costs about as much)."""
    tensors = travelling_tensors(resources.model)
    store_arrays(state, PERSONAL_STATE,  # serialised (copied) as they are stored
                 {name: tensors[name].detach().cpu().numpy() for name in personal})
    with torch.no_grad():
        for name in personal:
            tensors[name].copy_(torch.from_numpy(np.asarray(global_arrays[name])))


def keep_head_send_body(resources: TaskResources, state: RecordDict,
                        global_arrays: Mapping[str, NDArray]) -> None:
    """Store the trained head, and put the global head back for the reply."""
    keep_personal_send_shared(resources, state, global_arrays, head_names(resources.model))


class FedPer(Personalisation):
    """Shared body, personal head, trained together."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        load_shared_state(resources.model, own_head_model(state, global_arrays))
        result = train_part(resources, shard, seed, part_names(resources.model, "full"))
        keep_head_send_body(resources, state, global_arrays)
        return result

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        return own_head_model(state, global_arrays)

    def together_part(self, model: nn.Module) -> list[str]:
        return head_names(model)
