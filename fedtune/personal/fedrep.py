"""FedRep (Collins et al. 2021, "Exploiting shared representations for personalized federated
learning"): a shared body (representation) and a personal head. Each round a client puts its
own head on the global body, first trains the head alone for ``strategy.fedrep_head_epochs``
epochs (body fixed), then the body alone for the configured local epochs or steps (head
fixed), keeps the head and sends the body (the reply's head is the global one it received).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from flwr.app import RecordDict

from fedtune.models.weights import load_shared_state
from fedtune.personal.base import NDArray, Personalisation, train_part
from fedtune.personal.fedper import keep_head_send_body, own_head_model
from fedtune.personal.split import body_names, head_names
from fedtune.task import TaskResources
from fedtune.train import TrainResult


class FedRep(Personalisation):
    """Head epochs, then body epochs; the reply reports the body's training."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        model = resources.model
        load_shared_state(model, own_head_model(state, global_arrays))
        head_settings = replace(resources.train_settings, local_steps=0,
                                local_epochs=self.config.strategy.fedrep_head_epochs)
        train_part(resources, shard, seed, head_names(model), head_settings)
        result = train_part(resources, shard, seed, body_names(model))
        keep_head_send_body(resources, state, global_arrays)
        return result

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        return own_head_model(state, global_arrays)
