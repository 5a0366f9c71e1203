"""The personalisation interface and the local training steps its algorithms share.

A ``Personalisation`` says two things about one client (``shard``):

- ``train``: its training in a round, starting from the global model. It leaves in the
  resident model exactly what the reply carries: the shared part trained, the personal part
  at the global values it received (so nothing personal is ever released: the personal part
  of every reply equals what the server sent). It returns the training of what it sends (the
  reply's step and example counts), or None for the privacy mode's plain training.
- ``personal_arrays``: its personalised model for evaluation, from the global arrays and its
  state (None: it has none; the global model is its model).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedtune.config import personal_evaluation_settings
from fedtune.data.encode import Batch
from fedtune.models.weights import load_shared_state, shared_state, travelling_tensors
from fedtune.personal.split import part_names
from fedtune.tables import import_object
from fedtune.tables.strategies import STRATEGIES
from fedtune.train import (
    GradientTerms,
    TrainPass,
    TrainResult,
    TrainSettings,
    evaluate,
    make_optimizer,
)
from fedtune.train import train_local as train_loop

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.task import TaskResources

NDArray = np.ndarray
SELECTION_POINTS = 4  # fine-tuning is checked on the validation split this many times


class Personalisation:
    """An algorithm's client-side behaviour; the base class is FedAvg's (no personal model)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        """Train from the global model (loaded in the resident model); None = plain training."""
        return None

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        """The client's personalised model (travelling arrays), or None without one."""
        return None

    def together_part(self, model: nn.Module) -> list[str]:
        """For clients trained together (``fedtune.client.vectorised``): the travelling
        tensors a client trains from its own values, kept in its state under
        ``protocol.PERSONAL_STATE`` as ``store_arrays`` keeps them (its reply carries their
        global values). Only an algorithm that trains the whole model as plain training does,
        from its own values of some tensors, has them (FedPer)."""
        raise ValueError(f"{type(self).__name__}'s clients train one at a time")

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        """For clients trained together: ``train``'s passes of local training, in order (one
        pass of everything: FedPer's)."""
        return [TrainPass()]


def personalisation_of(config: Config) -> Personalisation:
    """The strategy's personalisation (the table entry's ``personal``; the base class, no
    personal model, for the other strategies)."""
    name = STRATEGIES[config.strategy.name].personal
    return (import_object(name) if name else Personalisation)(config)


def personal_evaluation_on(config: Config) -> bool:
    """Whether a run evaluates every client: asked for, or a personalised strategy
    (``fedtune.config.personal_evaluation_settings``)."""
    return bool(personal_evaluation_settings(config))


def stored_arrays(state: RecordDict | None, key: str) -> dict[str, NDArray] | None:
    """Arrays a client kept under ``key`` (None: none yet)."""
    if state is None or key not in state:
        return None
    record = state[key]
    return {name: array.numpy() for name, array in record.items()}


def store_arrays(state: RecordDict, key: str, arrays: Mapping[str, NDArray]) -> None:
    """Keep ``arrays`` (copies) under ``key`` of the client's state."""
    state[key] = ArrayRecord({name: _array(value) for name, value in arrays.items()})


def _array(value: NDArray):
    from flwr.app import Array

    return Array(np.asarray(value))  # Array serialises the values: a copy already


def with_part(arrays: Mapping[str, NDArray], part: Mapping[str, NDArray] | None
              ) -> dict[str, NDArray]:
    """``arrays`` with the tensors of ``part`` replaced (a client's own head, ...)."""
    merged = dict(arrays)
    if part:
        merged.update(part)
    return merged


def train_part(resources: TaskResources, shard: int, seed: int, names: Iterable[str],
               settings: TrainSettings | None = None,
               objective: GradientTerms | None = None,
               batches: Iterable[Batch] | None = None) -> TrainResult:
    """Train only the named travelling parameters of the resident model in place (a fresh
    optimizer over them; the rest stays as loaded) on the client's training split."""
    model = resources.model
    settings = settings or resources.train_settings
    tensors = travelling_tensors(model)
    chosen = set(names)
    params = [t for n, t in tensors.items() if n in chosen and isinstance(t, nn.Parameter)]
    # the others need no gradient (a head-only pass stops its backward at the head)
    fixed = [t for n, t in tensors.items() if n not in chosen and isinstance(t, nn.Parameter)]
    loader = batches if batches is not None else resources.client_train_loader(shard, seed)
    # every trainable tensor with the run's settings: the process's one optimizer, reset (the
    # same steps as a new one, without building one per client)
    whole = not fixed and settings is resources.train_settings and len(params) == sum(
        p.requires_grad for p in model.parameters())
    optimizer = resources.local_optimizer() if whole else make_optimizer(params, settings)
    try:
        for param in fixed:
            param.requires_grad_(False)
        result = train_loop(model, loader, settings, resources.device, objective,
                            optimizer=optimizer)
    finally:
        for param in fixed:
            param.requires_grad_(True)
    for param in params:
        param.grad = None
    return result


def validation_accuracy(resources: TaskResources, shard: int) -> float | None:
    """The resident model's accuracy on the client's validation split (None without one)."""
    loader = resources.client_val_loader(shard)
    if loader is None:
        return None
    return evaluate(resources.model, loader, resources.device).accuracy


def _batches(resources: TaskResources, shard: int, seed: int, steps: int) -> Iterator[Batch]:
    """``steps`` batches of the client's training split, cycling through it."""
    loader = resources.client_train_loader(shard, seed)
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def fine_tune(resources: TaskResources, shard: int, seed: int,
              start: Mapping[str, NDArray], part: str, steps: int) -> dict[str, NDArray]:
    """``steps`` local steps on ``part`` (head / full) of the model ``start``: local adaptation
    (Wang et al. 2019, "Federated evaluation of on-device personalization"). With a validation
    split, the model after 0, 1/4, ..., all of the steps that scores best on it is taken
    (earliest on a tie), never by the test split; without one, the last."""
    model = resources.model
    load_shared_state(model, start)
    names = part_names(model, part)
    if steps == 0 or not names:
        return dict(start)
    checkpoints = sorted({math.ceil(steps * k / SELECTION_POINTS)
                          for k in range(1, SELECTION_POINTS + 1)})
    best_accuracy = validation_accuracy(resources, shard)
    if best_accuracy is None:
        checkpoints = [steps]
    best = dict(start)
    settings = replace(resources.train_settings, local_steps=0, local_epochs=1)
    tensors = travelling_tensors(model)
    optimizer = make_optimizer([tensors[n] for n in names if isinstance(tensors[n], nn.Parameter)],
                               settings)
    stream, done = _batches(resources, shard, seed, steps), 0
    for checkpoint in checkpoints:
        segment = list(itertools.islice(stream, checkpoint - done))
        done = checkpoint
        train_loop(model, segment, settings, resources.device, optimizer=optimizer)
        accuracy = validation_accuracy(resources, shard)
        if accuracy is None or accuracy > best_accuracy:
            best_accuracy, best = accuracy, shared_state(model)
    for param in model.parameters():
        param.grad = None
    return best
