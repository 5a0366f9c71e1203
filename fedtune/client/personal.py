"""The client side of the personalised strategies (``personal`` in the strategy table): the
algorithm of ``fedtune.personal`` trains the client, with its state kept by the runtime
(``Context.state``: a personal head, a personal model, APFL's mixing weight)."""

from __future__ import annotations

from fedtune.client.algorithms import ClientSide
from fedtune.personal.base import personalisation_of
from fedtune.privacy.mode import LocalTraining
from fedtune.task import TaskResources


class PersonalClient(ClientSide):
    """Trains as the strategy's personalisation says; its reply carries the shared part."""

    def train(self, resources: TaskResources, shard: int, seed: int) -> LocalTraining | None:
        result = personalisation_of(resources.config).train(
            resources, shard, seed, self.state, self.global_arrays)
        return None if result is None else LocalTraining(result)
