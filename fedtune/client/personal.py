"""The client side of personalisation: the personalised strategies' training (``personal`` in
the strategy table: the algorithm of ``fedtune.personal`` trains the client, with its state
kept by the runtime, ``Context.state``: a personal head, a personal model, APFL's mixing
weight), and the answer to a personal evaluation message (``protocol.PERSONAL_MESSAGE_TYPE``)
where the client's state lives with it: its own models on its own local test split, metrics
only (no model, no state leaves the client)."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedtune import protocol
from fedtune.client.algorithms import ClientSide
from fedtune.personal.base import personalisation_of
from fedtune.personal.evaluation import client_rows, initial_arrays, local_only_row
from fedtune.privacy.mode import LocalTraining
from fedtune.task import TaskResources
from fedtune.train import TrainPass


class PersonalClient(ClientSide):
    """Trains as the strategy's personalisation says; its reply carries the shared part.
    Trained together (a ``client_together`` entry: FedPer, FedBABU, FedRep), it reads and
    writes no ``RecordDict``: its personal part (the personalisation's ``together_part``) is
    kept in the state's bytes by ``fedtune.client.vectorised``, which trains it in the
    personalisation's passes (``together_passes``)."""

    def train(self, resources: TaskResources, shard: int, seed: int) -> LocalTraining | None:
        result = personalisation_of(resources.config).train(
            resources, shard, seed, self.state, self.global_arrays)
        return None if result is None else LocalTraining(result)

    def personal_part(self, resources: TaskResources) -> list[str]:
        return personalisation_of(resources.config).together_part(resources.model)

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        return personalisation_of(resources.config).together_passes(resources)


def personal_metrics(resources: TaskResources, client_id: int, server_round: int,
                     global_arrays: dict[str, np.ndarray], state: RecordDict,
                     local_only: bool) -> dict[str, float | int]:
    """The reply to a personal evaluation: the rows ``fedtune.personal.evaluation`` computes
    for this client (the same the driver computes where a state store keeps the states), as
    ``protocol.personal_metric`` metrics."""
    rows = client_rows(resources, personalisation_of(resources.config), global_arrays, state,
                       client_id, server_round)
    if local_only:
        rows.append(local_only_row(resources, client_id, server_round,
                                   initial_arrays(resources)))
    metrics: dict[str, float | int] = {protocol.PARTITION_ID: client_id}
    for row in rows:
        metrics[protocol.personal_metric(row.model, "examples")] = row.examples
        if row.examples:
            metrics[protocol.personal_metric(row.model, "accuracy")] = row.accuracy
            metrics[protocol.personal_metric(row.model, "loss")] = row.loss
    return metrics
