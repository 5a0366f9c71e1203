"""FedBABU (Oh et al. 2022, "FedBABU: Toward enhanced representation for federated image
classification"): the body is trained federatedly under a head that never trains (its random
initialisation, the same in every client), and each client fine-tunes at the end
(``strategy.finetune_steps`` of ``strategy.finetune_part``, the head by default here).

A reply carries the trained body and the untouched head, so the global head stays the initial
one: FedAvg of equal heads is that head.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import RecordDict
from torch import nn

from fedtune.personal.base import NDArray, Personalisation, fine_tune, train_part
from fedtune.personal.split import body_names, head_names
from fedtune.task import TaskResources
from fedtune.train import TrainPass, TrainResult


class FedBABU(Personalisation):
    """Body-only training; the personalised model is the global one fine-tuned locally."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        return train_part(resources, shard, seed, body_names(resources.model))

    def together_part(self, model: nn.Module) -> list[str]:
        return []  # no personal tensor while training: the head is everyone's, and fixed

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        return [TrainPass(fixed=tuple(head_names(resources.model)))]  # as ``train``

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        s = self.config.strategy
        return fine_tune(resources, shard, seed, global_arrays, s.finetune_part,
                         s.finetune_steps)
