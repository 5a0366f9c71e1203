"""FedSA-LoRA (Guo et al. 2025, "Selective aggregation for low-rank adaptation in federated
learning"): of each LoRA adapter ``W + B A``, the ``A`` matrices learn what the clients share
and are aggregated; the ``B`` matrices stay with each client. Each round a client puts its own
``B`` matrices on the global model, trains adapters and head together, keeps its ``B`` and
sends the ``A`` matrices and the head (the reply's ``B`` are the global ones it received: peft
starts them at zero, and they stay there in the global model).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import RecordDict

from fedtune.models.weights import load_shared_state
from fedtune.personal.base import NDArray, Personalisation, train_part
from fedtune.personal.fedper import keep_personal_send_shared, own_head_model
from fedtune.personal.split import lora_names, part_names
from fedtune.task import TaskResources
from fedtune.train import TrainResult


class FedSALoRA(Personalisation):
    """Shared A, personal B."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        model = resources.model
        load_shared_state(model, own_head_model(state, global_arrays))
        result = train_part(resources, shard, seed, part_names(model, "full"))
        keep_personal_send_shared(resources, state, global_arrays, lora_names(model, "B"))
        return result

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        return own_head_model(state, global_arrays)
