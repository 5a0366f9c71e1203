"""Every client's models on its own local test split: the global model, its personalised model
(where the strategy makes one) and, with ``run.local_reference``, the model it trains alone.

It runs where the clients' states are, over every registered client, sampled or not: in the
driver for a runtime with a ``ClientStateStore`` (``evaluate_clients``), and in each client
(``client_rows``, ``local_only_row``) where its state lives with it (Flower's simulation, a
deployment's SuperNodes: ``fedtune.server.personal_messages``). Both compute the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedtune.models.build import build_model
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.personal.base import NDArray, Personalisation, validation_accuracy
from fedtune.personal.stats import GLOBAL, LOCAL_ONLY, PERSONALISED
from fedtune.task import TaskResources, client_round_seed, seed_torch
from fedtune.train import evaluate, train_local

# a stream of its own for the evaluation's fine-tuning: training draws stay as they were
PERSONAL_STREAM = 0x70657273


@dataclass(frozen=True)
class PersonalRow:
    """One line of personal.csv: one model of one client on its local test split."""

    round: int
    client_id: int
    model: str  # global | personalised | local_only
    accuracy: float | None
    loss: float | None
    examples: int


def personal_seed(run_seed: int, server_round: int, client_id: int) -> int:
    """The seed of a client's evaluation-time training (fine-tuning) in a round."""
    return int(np.random.SeedSequence([run_seed, server_round, client_id, PERSONAL_STREAM])
               .generate_state(1)[0])


def _row(resources: TaskResources, server_round: int, client: int, model: str,
         arrays: Mapping[str, NDArray]) -> PersonalRow:
    load_shared_state(resources.model, arrays)
    result = evaluate(resources.model, resources.client_test_loader(client), resources.device)
    if not result.num_examples:
        return PersonalRow(server_round, client, model, None, None, 0)
    return PersonalRow(server_round, client, model, result.accuracy, result.loss,
                       result.num_examples)


def client_rows(resources: TaskResources, personalisation: Personalisation,
                global_arrays: Mapping[str, NDArray], state: RecordDict | None, client: int,
                server_round: int) -> list[PersonalRow]:
    """The global and the personalised model of one client on its local test split (what the
    client computes itself where its state lives with it: ``fedtune.client.app``)."""
    rows = [_row(resources, server_round, client, GLOBAL, global_arrays)]
    seed = personal_seed(resources.config.run.seed, server_round, client)
    seed_torch(seed)
    personal = personalisation.personal_arrays(resources, client, state, global_arrays, seed)
    if personal is not None:
        rows.append(_row(resources, server_round, client, PERSONALISED, personal))
    return rows


def evaluate_clients(resources: TaskResources, personalisation: Personalisation,
                     global_arrays: Mapping[str, NDArray],
                     state_of: Callable[[int], RecordDict | None],
                     server_round: int) -> list[PersonalRow]:
    """The global and the personalised model of every client on its local test split."""
    return [row for client in range(resources.federation.num_clients)
            for row in client_rows(resources, personalisation, global_arrays,
                                   state_of(client), client, server_round)]


def train_alone(resources: TaskResources, client: int, initial: Mapping[str, NDArray]
                ) -> dict[str, NDArray]:
    """Client ``client``'s model trained on its own data only: from the run's initial weights,
    with the local training of every round it could take part in (``run.rounds`` times the
    configured local epochs or steps, each round's batches drawn with that round's seed). With
    a validation split the round that scores best on it is taken (earliest on a tie)."""
    config, model = resources.config, resources.model
    load_shared_state(model, initial)
    best, best_accuracy = dict(initial), validation_accuracy(resources, client)
    for server_round in range(1, config.run.rounds + 1):
        seed = client_round_seed(config.run.seed, server_round, client)
        seed_torch(seed)
        train_local(model, resources.client_train_loader(client, seed),
                    resources.train_settings, resources.device,
                    optimizer=resources.local_optimizer())
        accuracy = validation_accuracy(resources, client)
        if accuracy is None or accuracy > best_accuracy:
            best, best_accuracy = shared_state(model), accuracy
    return best


def initial_arrays(resources: TaskResources) -> dict[str, NDArray]:
    """The run's initial weights (what the global model starts from)."""
    return shared_state(build_model(resources.spec, resources.config.run.seed))


def local_only_row(resources: TaskResources, client: int, server_round: int,
                   initial: Mapping[str, NDArray]) -> PersonalRow:
    """One client's model trained alone, on its local test split."""
    return _row(resources, server_round, client, LOCAL_ONLY,
                train_alone(resources, client, initial))


def local_only_rows(resources: TaskResources, server_round: int) -> list[PersonalRow]:
    """Every client's model trained alone, on its local test split."""
    initial = initial_arrays(resources)
    return [local_only_row(resources, client, server_round, initial)
            for client in range(resources.federation.num_clients)]
