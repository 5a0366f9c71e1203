"""DP-SGD on one client (Abadi et al. 2016) with Opacus' PrivacyEngine: the Opacus side of
``privacy.mode = "local"`` (``fedtune.privacy.local``).

Every step draws a Poisson sample of the client's examples (Opacus' DPDataLoader), clips each
example's gradient to ``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier`` times
that bound. Per-example norms come from ghost clipping (Li et al. 2022; Opacus
``grad_sample_mode="ghost"``, no per-example gradients are stored) or from per-example
gradients (``"hooks"``). Only parameters with ``requires_grad`` are trained and privatised, so
frozen encoders and LoRA adapters work as they are.

The accountant's history is handed in and handed back: the caller keeps it (a Flower client in
its ``Context.state``), so ε accumulates over every round the client trains. Before a round the
client computes how many steps its budget still allows and trains at most that many
(``plan_steps``: the one rule this path, clients trained together - ``fedtune.client.
private_chunks``, which reproduce this path's steps batched, Opacus' numbers without Opacus -
and the server's own account follow).

Secrecy of the draws: the Poisson sample of every step and the Gaussian noise come from
``strategies.noise.SecureRandom`` (ChaCha20 keyed by OS entropy per draw), through
``SecurePoissonSampler`` and ``SecureNoiseEngine``. Opacus' own ``secure_mode`` would do the same
with torchcsprng, which is unmaintained and does not build for current torch; without it Opacus
draws both from torch's Mersenne Twister, which fedtune seeds per client and round from
run.seed - the server, which local DP protects the clients from, knows that seed. With
``privacy.insecure_reproducible_noise`` the old, reproducible and not private, path is kept
(Opacus' ``DPDataLoader`` seeded from the client's round seed, noise from torch's generator).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from fedtune.data.encode import Batch, Encoded
from fedtune.data.loaders import RowDataset
from fedtune.privacy.accounting import (
    HistoryEntry,
    compose,
    epsilon,
    noise_for_target,
    steps_within_budget,
    total_steps,
)
from fedtune.train import TrainResult, TrainSettings, make_optimizer, train_local
from strategies.noise import SecureRandom


@dataclass(frozen=True)
class LocalDPSettings:
    """One client's DP-SGD parameters (``local_dp_settings`` reads them from the config)."""

    delta: float
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str = "auto"
    target_epsilon: float = 0.0  # 0 = no target: noise_multiplier is given
    noise_multiplier: float = 0.0
    planned_rounds: int = 1  # rounds the noise is planned for (when derived from the target)
    secure: bool = True  # False: privacy.insecure_reproducible_noise (seeded, not private)


@dataclass(frozen=True)
class PrivateTrainResult:
    train: TrainResult
    history: list[HistoryEntry]
    epsilon: float
    noise_multiplier: float
    sample_rate: float
    stopped: str  # why training stopped early ("" when every planned step ran)


class PoissonRows(RowDataset):
    """Row numbers as 1-tuples (Opacus' DPDataLoader reads an item's structure).

    For transformers, batches also carry per-example contiguous ``position_ids`` (and
    ``token_type_ids``) when the model takes them: a shared (1, L) buffer has no per-example
    gradient and an expanded view breaks ghost clipping's embedding norms.
    """

    def __init__(self, encoded: Encoded, labels: np.ndarray, rows: np.ndarray,
                 position_inputs: frozenset[str] = frozenset()) -> None:
        super().__init__(encoded, labels, rows)
        self.position_inputs = position_inputs

    def __getitem__(self, position: int) -> tuple[int]:  # type: ignore[override]
        return (int(self.rows[position]),)

    def collate(self, items: list[tuple[int]]) -> Batch:  # type: ignore[override]
        """A batch; an empty Poisson sample gives tensors with 0 rows."""
        inputs, labels = super().collate([row for (row,) in items])
        if "input_ids" in inputs:
            batch, width = inputs["input_ids"].shape
            if "position_ids" in self.position_inputs:
                inputs["position_ids"] = torch.arange(width).repeat(batch, 1)
            if "token_type_ids" in self.position_inputs:
                inputs["token_type_ids"] = torch.zeros(batch, width, dtype=torch.long)
        return inputs, labels


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler (each example joins each batch with ``sample_rate``, for
    ``steps`` batches) with its coin flips from ``SecureRandom`` instead of a torch generator:
    which examples a step used is as secret as its noise, which amplification by subsampling
    assumes."""

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            flips = SecureRandom().random(self.num_samples) < self.sample_rate
            yield np.flatnonzero(flips).tolist()


def poisson_steps(num_examples: int, batch_size: int) -> int:
    """Poisson batches per epoch of a client with ``num_examples`` examples, as Opacus'
    ``DPDataLoader`` counts them (``int(1 / q)`` for ``q = 1 / ceil(n / batch)``, which float
    division makes one less for some n); the accountant's rate is one over it. The server
    computes it too (``fedtune.privacy.local``), to account each client itself."""
    batches = -(-num_examples // min(batch_size, num_examples))
    return int(1 / (1 / batches))


def poisson_loader(encoded: Encoded, labels: np.ndarray, rows: np.ndarray, batch_size: int,
                   seed: int, model: nn.Module, secure: bool = True) -> DataLoader:
    """Poisson-sampling batches: each example joins each batch with probability
    1/ceil(n/batch_size), so batches hold ``batch_size`` examples on average. ``secure``: the
    coin flips come from ``SecurePoissonSampler``; else Opacus' ``DPDataLoader`` draws them
    from a torch generator seeded with ``seed`` (reproducible, not private)."""
    accepted = _encoder_accepts(model) & {"position_ids", "token_type_ids"}
    dataset = PoissonRows(encoded, labels, rows, frozenset(accepted))
    if secure:
        steps = poisson_steps(len(dataset), batch_size)
        sampler = SecurePoissonSampler(num_samples=len(dataset), sample_rate=1 / steps,
                                       steps=steps)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate)
    plain = DataLoader(dataset, batch_size=min(batch_size, len(dataset)),
                       collate_fn=dataset.collate,
                       generator=torch.Generator().manual_seed(seed))
    loader = DPDataLoader.from_data_loader(plain)
    loader.collate_fn = dataset.collate  # ours builds empty batches from the first one too
    return loader


class SecureNoise:
    """An Opacus DP optimizer whose Gaussian noise comes from ``SecureRandom`` (the same std
    and the same bookkeeping as Opacus' ``add_noise``)."""

    def add_noise(self) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        source = SecureRandom()
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = torch.from_numpy(source.normal(0.0, std, tuple(p.summed_grad.shape)))
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecureDPOptimizer(SecureNoise, DPOptimizer):
    """Opacus' DPOptimizer (per-example gradients, ``grad_sample_mode = "hooks"``)."""


class SecureGhostDPOptimizer(SecureNoise, DPOptimizerFastGradientClipping):
    """Opacus' optimizer for ghost clipping (``grad_sample_mode = "ghost"``)."""


_SECURE_OPTIMIZERS = {DPOptimizer: SecureDPOptimizer,
                      DPOptimizerFastGradientClipping: SecureGhostDPOptimizer}


class SecureNoiseEngine(PrivacyEngine):
    """Opacus' PrivacyEngine whose optimizers draw their noise from ``SecureRandom``."""

    def __init__(self, *, accountant: str) -> None:
        with warnings.catch_warnings():  # its "Secure RNG turned off" is about torchcsprng
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(accountant=accountant)

    def _prepare_optimizer(self, *, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                           max_grad_norm: float, expected_batch_size: int,
                           loss_reduction: str = "mean", distributed: bool = False,
                           clipping: str = "flat", noise_generator: object = None,
                           grad_sample_mode: str = "hooks", **kwargs: object) -> DPOptimizer:
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        base = get_optimizer_class(clipping=clipping, distributed=distributed,
                                   grad_sample_mode=grad_sample_mode)
        if base not in _SECURE_OPTIMIZERS:
            raise ValueError(f"no secure-noise variant of Opacus' {base.__name__}")
        return _SECURE_OPTIMIZERS[base](
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
            generator=None, secure_mode=False, **kwargs)


def ties_parameters(model: nn.Module) -> bool:
    """True if one parameter object appears under two names (ghost clipping forbids it)."""
    named = list(model.named_parameters(remove_duplicate=False))
    return len(named) != len({id(p) for _, p in named})


def resolve_grad_sample_mode(model: nn.Module, mode: str) -> str:
    if mode == "auto":
        return "hooks" if ties_parameters(model) else "ghost"
    return mode


def _encoder_accepts(model: nn.Module) -> set[str]:
    """Keyword inputs the innermost transformers model accepts (empty for the MLP)."""
    inner = getattr(model, "encoder", model)
    if not hasattr(inner, "config"):
        return set()
    return set(inspect.signature(inner.forward).parameters)


def client_noise(dp: LocalDPSettings, sample_rate: float, steps_each_round: int) -> float:
    """The given noise multiplier, or the one that spends ``target_epsilon`` exactly over
    ``planned_rounds`` rounds of ``steps_each_round`` steps."""
    if dp.noise_multiplier:
        return dp.noise_multiplier
    return noise_for_target(dp.target_epsilon, dp.delta, sample_rate,
                            dp.planned_rounds * steps_each_round, dp.accountant)


@dataclass(frozen=True)
class StepPlan:
    """What one client's DP-SGD does this round, before it draws anything: its accounted
    Poisson rate, the steps it wants and its budget allows, its noise multiplier, Opacus'
    expected batch size (the divisor of ``loss_reduction = "mean"``), and why it stops early
    ("" when every wanted step runs)."""

    sample_rate: float
    wanted: int
    allowed: int
    noise_multiplier: float
    expected_batch_size: int
    spent_before: float  # ε of the history it starts from
    stopped: str

    def history_after(self, history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
        """The accountant's history after the ``allowed`` steps (Opacus' accountant adds a step
        at a time, merging equal (σ, q) into the last entry, as ``compose`` does)."""
        return compose(history, self.noise_multiplier, self.sample_rate, self.allowed)


def plan_steps(num_examples: int, batches_per_epoch: int, settings: TrainSettings,
               dp: LocalDPSettings, history: Sequence[HistoryEntry]) -> StepPlan:
    """One client's ``StepPlan`` from its training-set size, its Poisson batches per epoch
    (``poisson_steps``; the loader's length), its settings and its accountant history: the
    rule ``train_private`` follows, clients trained together follow
    (``fedtune.client.private_chunks``) and the server replays (``fedtune.privacy.local``)."""
    # the rate Opacus' accountant records for a step over such a loader: 1 / its length
    sample_rate = 1.0 / batches_per_epoch
    wanted = settings.local_steps or settings.local_epochs * batches_per_epoch
    noise = client_noise(dp, sample_rate, wanted)
    allowed = wanted
    if dp.target_epsilon:
        allowed = steps_within_budget(history, noise, sample_rate, wanted, dp.target_epsilon,
                                      dp.delta, dp.accountant)
    spent_before = epsilon(history, dp.delta, dp.accountant)
    stopped = ""
    if allowed < wanted:
        stopped = (f"privacy budget: trained {allowed} of {wanted} steps; one more step would "
                   f"take epsilon from {_eps_text(history, noise, sample_rate, allowed, dp)} "
                   f"above target_epsilon {dp.target_epsilon:g} (after {total_steps(history)} "
                   f"earlier steps, epsilon {spent_before:.4g})")
    # Opacus' make_private: int(len(dataset) * sample_rate)
    return StepPlan(sample_rate, wanted, allowed, noise, int(num_examples * sample_rate),
                    spent_before, stopped)


def train_private(model: nn.Module, loader: DPDataLoader, settings: TrainSettings,
                  dp: LocalDPSettings, history: Sequence[HistoryEntry],
                  device: torch.device) -> PrivateTrainResult:
    """DP-SGD on a copy of ``model`` (Opacus never touches it), whose trained weights are then
    copied back, so ``model``'s names never carry Opacus' ``_module.`` prefix."""
    plan = plan_steps(len(loader.dataset), len(loader), settings, dp, history)
    sample_rate, noise = plan.sample_rate, plan.noise_multiplier
    if plan.allowed == 0:
        return PrivateTrainResult(TrainResult(math.nan, 0, 0, 0.0), list(history),
                                  plan.spent_before, noise, sample_rate, plan.stopped)

    private = copy.deepcopy(model).to(device).train()
    optimizer = make_optimizer([p for p in private.parameters() if p.requires_grad], settings)
    engine = (SecureNoiseEngine(accountant=dp.accountant) if dp.secure
              else PrivacyEngine(accountant=dp.accountant))
    engine.accountant.history = list(history)
    mode = resolve_grad_sample_mode(private, dp.grad_sample_mode)
    wrapped = engine.make_private(
        module=private, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise, max_grad_norm=dp.max_grad_norm, poisson_sampling=False,
        grad_sample_mode=mode,
    )
    dp_model, dp_optimizer = wrapped[0], wrapped[1]
    criterion = wrapped[2] if mode == "ghost" else None
    result = train_local(dp_model, wrapped[-1], replace(settings, local_steps=plan.allowed),
                         device, optimizer=dp_optimizer, loss_fn=criterion)
    with torch.no_grad():
        model.load_state_dict(private.state_dict())
    new_history = [(float(n), float(q), int(s)) for n, q, s in engine.accountant.history]
    return PrivateTrainResult(result, new_history, epsilon(new_history, dp.delta, dp.accountant),
                              noise, sample_rate, plan.stopped)


def _eps_text(history: Sequence[HistoryEntry], noise: float, rate: float, steps: int,
              dp: LocalDPSettings) -> str:
    now = epsilon(compose(history, noise, rate, steps), dp.delta, dp.accountant)
    after = epsilon(compose(history, noise, rate, steps + 1), dp.delta, dp.accountant)
    return f"{now:.4g} to {after:.4g}"
