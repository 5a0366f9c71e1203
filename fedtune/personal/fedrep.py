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
from torch import nn

from fedtune.models.weights import load_shared_state
from fedtune.personal.base import NDArray, Personalisation, train_part
from fedtune.personal.fedper import keep_head_send_body, own_head_model
from fedtune.personal.split import body_names, head_names
from fedtune.task import TaskResources
from fedtune.train import TrainPass, TrainResult, TrainSettings


class FedRep(Personalisation):
    """Head epochs, then body epochs; the reply reports the body's training."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        model = resources.model
        load_shared_state(model, own_head_model(state, global_arrays))
        train_part(resources, shard, seed, head_names(model), self._head_settings(resources))
        result = train_part(resources, shard, seed, body_names(model))
        keep_head_send_body(resources, state, global_arrays)
        return result

    def together_part(self, model: nn.Module) -> list[str]:
        return head_names(model)

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        model = resources.model  # as ``train``: the head alone, then the body alone
        return [TrainPass(fixed=tuple(body_names(model)), settings=self._head_settings(resources)),
                TrainPass(fixed=tuple(head_names(model)))]

    def _head_settings(self, resources: TaskResources) -> TrainSettings:
        """The head's epochs (``strategy.fedrep_head_epochs``), with the run's optimizer."""
        return replace(resources.train_settings, local_steps=0,
                       local_epochs=self.config.strategy.fedrep_head_epochs)

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        return own_head_model(state, global_arrays)
