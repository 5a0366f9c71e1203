"""Local training and evaluation: plain functions of (model, loader, settings), no Flower inside."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from sklearn.metrics import classification_report
from torch import nn

from fedtune.data.encode import Batch


@dataclass(frozen=True)
class TrainSettings:
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.0
    local_epochs: int = 1
    local_steps: int = 0
    max_grad_norm: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast


@dataclass(frozen=True)
class TrainPass:
    """One pass of a client's local training as clients trained together run it
    (``fedtune.client.vectorised``): the trainable tensors that stay fixed during it; its
    schedule (None: the run's ``TrainSettings``); whether it starts from the client's own
    values of its personal tensors (else the global model) and keeps what it trains of them
    (else its trained model is only the reply: a pass that keeps them replies their global
    values); and the weight of a proximal pull towards the global model (Ditto's lambda). Most
    clients make one pass of everything; FedBABU's fixes the head, FedRep's trains the head and
    then the body, Ditto's trains its personal model and then the global one."""

    fixed: tuple[str, ...] = ()
    settings: TrainSettings | None = None
    from_own: bool = True
    keeps: bool = True
    proximal: float = 0.0

    def kept(self, personal: Iterable[str]) -> list[str]:
        """The ``personal`` tensors this pass trains and keeps."""
        return [name for name in personal if self.keeps and name not in self.fixed]


class GradientTerms(Protocol):
    """Extra terms of a local objective whose gradients are added after ``backward``
    (``fedtune.client.objective.LocalObjective``)."""

    def adjust_gradients(self, model: nn.Module) -> None: ...


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    """What local training did: the mean loss over the examples it saw (NaN: it saw none, and
    its reply carries no loss), the examples and steps, and the seconds it took."""

    loss: float
    num_examples: int
    num_steps: int
    duration_s: float


TEST_COLUMNS = ("eval_accuracy", "eval_macro_f1", "eval_loss")  # metrics.csv's global test scores


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int
    report: dict | None = None
    truth: np.ndarray | None = None  # the labels and the predictions behind the scores
    predicted: np.ndarray | None = None

    def test_columns(self) -> dict[str, float]:
        """These scores as metrics.csv's and summary.json's global test columns."""
        return dict(zip(TEST_COLUMNS, (self.accuracy, self.macro_f1, self.loss), strict=True))

    def classification_report(self, label_names: tuple[str, ...]) -> dict | None:
        """Per-class precision, recall and F1 (scikit-learn's report) of these predictions."""
        if self.truth is None or self.predicted is None:
            return None
        return per_class_report(self.truth, self.predicted, label_names)


def per_class_report(truth: np.ndarray, predicted: np.ndarray,
                     label_names: tuple[str, ...]) -> dict:
    return classification_report(
        truth, predicted, labels=list(range(len(label_names))), target_names=list(label_names),
        output_dict=True, zero_division=0,
    )


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits from a model that returns a tensor or a transformers output with ``.logits``."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


FUSED_DEVICES = ("cpu", "cuda")
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The configured local optimizer; Adam and AdamW use torch's fused kernels where the
    parameters live on a device that has them (about 1.5x faster per small step on CPU than
    the default per-tensor loop)."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                fused=fused or None)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                             fused=fused or None)


def reset_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` as if new: every step counter and moment of its state zeroed in place
    (a first step from zeros is the same as a fresh optimizer's, and nothing is allocated
    again), so one optimizer serves client after client."""
    tensors = [value for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value)]
    if tensors:
        torch._foreach_zero_(tensors)  # one call, as Optimizer.zero_grad zeroes gradients
    return optimizer


def _to(batch: Batch, device: torch.device) -> Batch:
    inputs, labels = batch
    if labels.device == device and all(v.device == device for v in inputs.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, labels.to(device)


def local_batches(loader: Iterable[Batch], settings: TrainSettings) -> Iterator[Batch]:
    """local_steps batches (cycling through the loader), or local_epochs full passes."""
    if settings.local_steps:
        done = 0
        while done < settings.local_steps:
            for batch in loader:
                yield batch
                done += 1
                if done == settings.local_steps:
                    return
    else:
        for _ in range(settings.local_epochs):
            yield from loader


def train_local(
    model: nn.Module, loader: Iterable[Batch], settings: TrainSettings, device: torch.device,
    objective: GradientTerms | None = None, optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFunction | None = None,
) -> TrainResult:
    """Train in place; returns the mean training loss over the examples seen (NaN when every
    batch was empty: DP-SGD steps whose Poisson samples drew no example).

    ``objective`` adds an algorithm's terms (FedProx, FedDyn, SCAFFOLD) to every gradient; the
    reported loss is the data loss alone. ``optimizer`` and ``loss_fn`` default to the
    configured optimizer over the trainable parameters and cross-entropy; DP-SGD passes Opacus'
    wrapped ones.
    """
    start = time.perf_counter()
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:  # the parameters it steps (walking the model's modules costs more than a small step)
        params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.device != device for p in params):
        model.to(device)
    if not model.training:
        model.train()
    if optimizer is None:
        optimizer = make_optimizer(params, settings)
    if loss_fn is None:
        loss_fn = nn.functional.cross_entropy  # CrossEntropyLoss' own function, no module call
    dtype = AUTOCAST_DTYPES.get(settings.precision)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    plain_zero_grad = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
    total_loss, seen, steps = 0.0, 0, 0
    for batch in local_batches(loader, settings):
        inputs, labels = _to(batch, device)
        if plain_zero_grad:  # what it does, without its profiler scope (costs more than a
            for param in params:  # small client's forward pass)
                param.grad = None
        else:  # Opacus' DPOptimizer also clears its per-sample gradients
            optimizer.zero_grad(set_to_none=True)
        if dtype is None:
            loss = loss_fn(logits_of(model, inputs).float(), labels)
        else:
            with torch.autocast(device.type, dtype=dtype):
                loss = loss_fn(logits_of(model, inputs).float(), labels)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None and (objective is not None or settings.max_grad_norm):
            scaler.unscale_(optimizer)  # both act on true gradients
        if objective is not None:
            objective.adjust_gradients(model)
        if settings.max_grad_norm:
            nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        examples = labels.shape[0]  # len() of a tensor goes through torch's function dispatch
        if examples:  # an empty Poisson sample (DP-SGD) steps on noise alone; its loss is NaN
            total_loss += loss.item() * examples
            seen += examples
        steps += 1
    mean_loss = total_loss / seen if seen else math.nan
    return TrainResult(mean_loss, seen, steps, time.perf_counter() - start)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the labels in ``y_true`` or ``y_pred``: scikit-learn's
    ``f1_score(y_true, y_pred, average="macro", zero_division=0)``, bit for bit.

    Written here because scikit-learn's input validation costs ~1.4 ms a call, paid once per
    client per evaluation (2,000 calls in a 1,000-client personal evaluation) for a sum over a
    few labels. The same float64 steps as scikit-learn 1.9 (F = 2 tp / (true + predicted), the
    mean of the labels'); every label in the union has true + predicted > 0, so no division by
    zero. ``tests/client/test_train.py`` checks it against ``f1_score`` on random labels.
    """
    labels, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_codes, pred_codes = codes[:len(y_true)], codes[len(y_true):]
    true_sum = np.bincount(true_codes, minlength=len(labels))
    pred_sum = np.bincount(pred_codes, minlength=len(labels))
    tp_sum = np.bincount(true_codes[true_codes == pred_codes], minlength=len(labels))
    f_score = (2.0 * tp_sum.astype(np.float64)) / (
        1.0 * true_sum.astype(np.float64) + pred_sum.astype(np.float64))
    return float(np.mean(f_score))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    label_names: tuple[str, ...] | None = None,
) -> EvalResult:
    """Loss, accuracy and macro-F1; with ``label_names`` also a per-class report."""
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, truth, predicted = 0.0, [], []
    for batch in loader:
        inputs, labels = _to(batch, device)
        logits = logits_of(model, inputs)
        total_loss += loss_fn(logits.float(), labels).item()
        truth.append(labels.cpu().numpy())
        predicted.append(logits.argmax(dim=-1).cpu().numpy())
    if not truth:
        return EvalResult(math.nan, math.nan, math.nan, 0)
    y_true, y_pred = np.concatenate(truth), np.concatenate(predicted)
    return EvalResult(
        loss=total_loss / len(y_true),
        accuracy=float((y_true == y_pred).mean()),
        macro_f1=macro_f1(y_true, y_pred),
        num_examples=len(y_true),
        report=None if label_names is None else per_class_report(y_true, y_pred, label_names),
        truth=y_true,
        predicted=y_pred,
    )
