"""Fine-tuning after federated training (local adaptation).

FedAvg trains the global model; each client's personalised model is the global model after
``strategy.finetune_steps`` local steps on its own training split, of the head or of every
travelling tensor (``strategy.finetune_part``; with ``model.transfer = "lora"`` "full" is the
adapters and the head: LoRA-only). Wang et al. (2019), "Federated evaluation of on-device
personalization"; Yu et al. (2020), "Salvaging federated learning by local adaptation".
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import RecordDict

from fedtune.personal.base import NDArray, Personalisation, fine_tune
from fedtune.task import TaskResources


class FineTune(Personalisation):
    """FedAvg's training; the personalised model is the global one fine-tuned locally."""

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        s = self.config.strategy
        return fine_tune(resources, shard, seed, global_arrays, s.finetune_part,
                         s.finetune_steps)
