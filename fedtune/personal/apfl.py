"""APFL (Deng et al. 2020, "Adaptive personalized federated learning"): each client keeps a
local model ``v`` and a mixing weight ``alpha``; its personalised model is the mixture

    v_bar = alpha * v + (1 - alpha) * w

of ``v`` and the global model ``w``. On every local batch (Algorithm 1 of the paper), with
``v_bar`` taken at the step's start:

    w     <- w - lr * grad f(w)                       (the global update, which is sent)
    v     <- v - lr * grad_v f(v_bar) = v - lr * alpha * grad f(v_bar)
    alpha <- alpha - lr_alpha * <grad f(v_bar), v - w>, clipped to [0, 1]

``v`` starts as the first global model the client receives; ``alpha`` starts at
``strategy.apfl_alpha`` (lr_alpha: ``strategy.apfl_alpha_lr``; 0 keeps alpha fixed). Both live
in the client's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.func import functional_call

from fedtune.data.encode import Batch
from fedtune.models.weights import travelling_tensors
from fedtune.personal.base import NDArray, Personalisation, store_arrays, stored_arrays
from fedtune.protocol import PERSONAL_MIX_STATE, PERSONAL_STATE
from fedtune.task import TaskResources
from fedtune.train import TrainResult, local_batches, make_optimizer
from fedtune.train import train_local as train_loop

ALPHA = "alpha"


def stored_alpha(state: RecordDict | None, initial: float) -> float:
    """The client's mixing weight (``initial`` before its first round)."""
    if state is None or PERSONAL_MIX_STATE not in state:
        return initial
    return float(state[PERSONAL_MIX_STATE][ALPHA])


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


class MixtureStep:
    """Before each step of ``w`` (``fedtune.train.train_local``'s gradient hook, which runs
    after ``backward`` on the batch), the step of ``v`` and ``alpha`` on the same batch, from
    the mixture at the step's start."""

    def __init__(self, model: nn.Module, personal: dict[str, torch.Tensor], alpha: float,
                 alpha_lr: float, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.personal = personal
        self.alpha = torch.tensor(alpha, dtype=torch.float32, requires_grad=True)
        self.alpha_lr = alpha_lr
        self.optimizer = optimizer
        self.batch: Batch | None = None

    def adjust_gradients(self, model: nn.Module) -> None:
        inputs, labels = self.batch  # type: ignore[misc]
        device = self.alpha.device if not self.personal else next(
            iter(self.personal.values())).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        labels = labels.to(device)
        shared = travelling_tensors(model)
        mixed = {name: self.alpha * v + (1 - self.alpha) * shared[name].detach()
                 for name, v in self.personal.items()}
        loss = nn.functional.cross_entropy(
            _logits(functional_call(model, mixed, args=(), kwargs=inputs)).float(), labels)
        *grads, grad_alpha = torch.autograd.grad(loss, [*self.personal.values(), self.alpha])
        for v, grad in zip(self.personal.values(), grads, strict=True):
            v.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            self.alpha -= self.alpha_lr * grad_alpha
            self.alpha.clamp_(0.0, 1.0)


class _Recording:
    """The training batches, each handed to the mixture step before it is trained on."""

    def __init__(self, batches: Iterable[Batch], step: MixtureStep) -> None:
        self.batches = batches
        self.step = step

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.step.batch = batch
            yield batch


class APFL(Personalisation):
    """Adaptive mixing of a local and the global model."""

    def train(self, resources: TaskResources, shard: int, seed: int, state: RecordDict,
              global_arrays: Mapping[str, NDArray]) -> TrainResult | None:
        model, settings, s = resources.model, resources.train_settings, self.config.strategy
        shared = {name: t for name, t in travelling_tensors(model).items()
                  if isinstance(t, nn.Parameter)}
        stored = stored_arrays(state, PERSONAL_STATE) or dict(global_arrays)
        personal = {name: torch.tensor(np.asarray(stored[name]), device=resources.device,
                                       requires_grad=True) for name in shared}
        step = MixtureStep(model, personal, stored_alpha(state, s.apfl_alpha), s.apfl_alpha_lr,
                           make_optimizer(list(personal.values()), settings))
        batches = _Recording(local_batches(resources.client_train_loader(shard, seed),
                                           settings), step)
        once = replace(settings, local_steps=0, local_epochs=1)  # the batches are expanded
        result = train_loop(model, batches, once, resources.device, objective=step,
                            optimizer=make_optimizer(list(shared.values()), settings))
        for param in model.parameters():
            param.grad = None
        store_arrays(state, PERSONAL_STATE,
                     {name: v.detach().cpu().numpy() for name, v in personal.items()})
        state[PERSONAL_MIX_STATE] = ConfigRecord({ALPHA: float(step.alpha.detach())})
        return result

    def personal_arrays(self, resources: TaskResources, shard: int, state: RecordDict | None,
                        global_arrays: Mapping[str, NDArray], seed: int
                        ) -> dict[str, NDArray] | None:
        personal = stored_arrays(state, PERSONAL_STATE)
        if personal is None:
            return dict(global_arrays)
        alpha = stored_alpha(state, self.config.strategy.apfl_alpha)
        return {name: (alpha * personal[name] + (1 - alpha) * value).astype(value.dtype)
                if name in personal else value for name, value in global_arrays.items()}
