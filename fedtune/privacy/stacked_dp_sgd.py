"""DP-SGD's mechanism for a stack of clients trained together: ``privacy.mode = "local"`` where
``fedtune.client.private_chunks`` trains a chunk of clients at once.

Each client of the stack runs the step of Abadi et al. 2016 ("Deep learning with differential
privacy", Algorithm 1) that Opacus' ``DPOptimizer`` runs for one client (``fedtune.privacy.
dp_sgd``), with the same numbers:

- a Poisson sample: each of the client's examples joins the step with the client's accounted
  rate ``q = 1 / poisson_steps(n, batch_size)`` (``poisson_flips``);
- each example's gradient ``g_i`` clipped to ``C = privacy.max_grad_norm`` by Opacus' flat
  clipping, ``g_i * min(1, C / (||g_i|| + 1e-6))`` with ``||g_i||`` the norm over every
  trainable tensor, and summed over the sample (``clipped_sums``; Opacus 1.6
  ``DPOptimizer.clip_and_accumulate``);
- Gaussian noise of std ``sigma * C`` added to the sum and the result divided by Opacus'
  expected batch size ``int(n * q)`` (``noised_means``; ``add_noise`` and ``scale_grad`` with
  ``loss_reduction = "mean"``).

The draws that must stay secret - the coin flips and the noise - come from ``strategies.noise.
SecureRandom`` (ChaCha20 under a fresh OS-entropy key per call), as the one-at-a-time path's
``SecurePoissonSampler`` and ``SecureNoise`` draw them, but in one call per chunk and step (the
flips of a group's every step in one call) instead of one per client, tensor and step; never
from run.seed. Per-example gradients come from a nested ``torch.func.vmap`` (clients x
examples), torch.func's per-sample-gradients recipe; their sums here are one reduction over the
stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES
from strategies.noise import SecureRandom

if TYPE_CHECKING:
    from fedtune.config import Config

OPACUS_EPS = 1e-6  # Opacus' flat clipping: C / (||g_i|| + 1e-6)


def private_one_at_a_time_because(config: Config) -> str | None:
    """Why a run under a privacy mode trains its clients one at a time (None: they may train
    together under this module's mechanism): this module is the mechanism of a mode whose
    clients run DP-SGD under their own accountants (the table's ``client_accountants``: local
    DP)."""
    p, strategy = config.privacy, config.strategy
    if not PRIVACY_MODES[p.mode].client_accountants:
        return f"privacy.mode = {p.mode!r} trains with its own mechanism"
    if p.insecure_reproducible_noise:
        return ("privacy.insecure_reproducible_noise = true: Opacus' seeded draws, one client "
                "at a time (reproducible, not private)")
    if STRATEGIES[strategy.name].client:
        return (f"privacy.mode = 'local' trains plain clients together, not strategy.name = "
                f"{strategy.name!r}'s client side")
    return None


def poisson_flips(sizes: Sequence[int], rates: Sequence[float], steps: int) -> np.ndarray:
    """Which examples each of ``steps`` Poisson samples takes: (steps, sum(sizes)) booleans,
    client k's examples in columns ``sum(sizes[:k])`` onwards, each True with client k's rate
    ``rates[k]``; one ``SecureRandom`` call for the whole stack (``SecurePoissonSampler``
    draws ``random(n) < q`` per client and step)."""
    per_example = np.repeat(np.asarray(rates, dtype=np.float64), sizes)
    uniforms = SecureRandom().random((steps, len(per_example)))
    return uniforms < per_example


def clipped_sums(grads: Sequence[torch.Tensor], mask: torch.Tensor, max_grad_norm: float
                 ) -> list[torch.Tensor]:
    """Each client's sum of its sampled examples' clipped gradients: ``grads`` are per-example
    gradients (clients x width x the tensor's shape), ``mask`` (clients x width) 1 for a
    sampled example and 0 for padding; the clip factor of an example is Opacus' flat one over
    its norm across all tensors."""
    norms = torch.stack([g.flatten(2).norm(2, dim=-1) for g in grads], dim=-1).norm(2, dim=-1)
    factor = (max_grad_norm / (norms + OPACUS_EPS)).clamp(max=1.0) * mask
    return [torch.einsum("cw,cw...->c...", factor, g) for g in grads]


def noised_means(sums: Sequence[torch.Tensor], stds: np.ndarray, divisors: np.ndarray
                 ) -> list[torch.Tensor]:
    """``(sum + N(0, std_k^2)) / divisor_k`` for each client k (row k of every tensor): the
    noise of every client and tensor from one ``SecureRandom`` call, in float64 and added in
    the tensors' dtype, as ``SecureNoise.add_noise`` adds it; ``stds``: noise multiplier times
    ``max_grad_norm`` per client (all 0: no noise drawn), ``divisors``: the expected batch
    sizes."""
    clients = len(stds)
    sizes = [s[0].numel() for s in sums]
    out = list(sums)
    if np.any(stds):
        draws = SecureRandom().standard_normal((clients, sum(sizes)))
        noise = torch.from_numpy(draws * np.asarray(stds, dtype=np.float64)[:, None])
        out = [s + part.to(s).view_as(s)
               for s, part in zip(sums, noise.split(sizes, dim=1), strict=True)]
    divisor = torch.as_tensor(np.asarray(divisors), dtype=sums[0].dtype)
    return [t / divisor.view(-1, *[1] * (t.dim() - 1)) for t in out]
