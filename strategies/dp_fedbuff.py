"""DP-FedBuff: buffered asynchronous aggregation with user-level central differential privacy.

The mechanism is FedBuff's (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639, Algorithm 1; its buffer is what
they argue makes asynchronous FL compatible with central DP) with the Gaussian mechanism of
DP-FedAvg (McMahan et al. 2018) moved to the buffer - the buffer is the release:

- each client update ``delta_i = y_i - x_(t_i)`` (floating arrays only) is clipped to L2 norm
  ``C`` when it arrives and scaled by the staleness weight ``s(tau) = 1 / sqrt(1 + tau) <= 1``,
  so one update moves the buffer by at most ``C``;
- a client contributes at most one update to a buffer (a second one from the same client is
  refused: ``refuses``), so one client moves a release's sum by at most ``C``;
- when ``K`` updates are in, Gaussian noise ``N(0, sigma^2 C^2)`` is added *once* to the sum
  and the server steps ``x <- x + server_lr * (sum + noise) / K`` (a fixed denominator: the
  buffer always holds exactly ``K``).

Each release is then one Gaussian mechanism of noise multiplier ``sigma`` on a sum of
sensitivity ``C`` (``fedtune.privacy.central_dp`` accounts them: composed over every release,
without amplification by sampling: the Gaussian mechanism's Rényi DP composed adaptively,
Mironov 2017; ``docs/privacy.md`` says what that assumes). Integer arrays keep the server's
values.

Secrecy of the draws (``strategies.noise``): the noise comes from ``SecureRandom`` (ChaCha20
keyed by OS entropy per draw) unless ``seed`` is given, which selects NumPy generators seeded
with ``(seed, release)`` - reproducible and *not private*. The release count is an attribute,
so a checkpoint taken mid-buffer resumes to the same bits under a seed.

Metrics of every release (``release_metrics``): ``dp-clip-norm``, ``dp-noise-std`` (std of the
noise on each coordinate of the mean update), ``dp-cohort`` (updates in the buffer) and
``dp-unclipped`` (how many were not clipped: a simulation diagnostic).

Canary clients for the privacy audit (``canaries``; Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar 2024, "One-shot Empirical Privacy Estimation for Federated Learning", ICLR), as in
``strategies.dp_fedavg``: each has a fixed random unit direction ``u_i`` over the floating arrays
and half of them (``canary_inserted``) are inserted; they enter a *shadow release* only
(``canary_release``: the same clipped sum and the same noise plus the canaries, stepped the same
way), never the reported model. Each inserted canary adds ``C · u_i`` to **every** release: the
most one client can move the sum (one update per buffer, staleness weight 1), which is what the
accountant assumes of every client (every release composed, no sampling). The final shadow
release's projection on ``u_i`` is then ``η C T / K`` plus Gaussian noise of std
``η σ C √T / K`` for an inserted canary after T releases: exactly the accounted mechanism, a
Gaussian of multiplier ``σ / √T``, so the audit's estimate reads the accountant's bound tightly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from strategies.asynchronous import NDArrays, same_dtype
from strategies.dp_fedavg import (
    CLIP_NORM,
    COHORT,
    NOISE_STD,
    UNCLIPPED,
    canary_inserted,
    canary_sum,
)
from strategies.fedbuff import FedBuff
from strategies.noise import SecureRandom

_UNCLIPPED = "dp-unclipped"  # beside a prepared update: 1 if clipping left it as it was
_RELEASE_NOISE = 2801  # the stream of the seeded (insecure) noise: [seed, stream, release]


class DPFedBuff(FedBuff):
    """FedBuff whose every buffer release is a Gaussian mechanism (``noise_multiplier``
    sigma, clipping bound ``clipping_norm`` C); ``seed``: None = secret noise, an int =
    reproducible noise (not private); ``canaries``: canary clients for the audit (0 = none),
    their directions and which half is inserted drawn from ``canary_seed``."""

    def __init__(self, *, noise_multiplier: float, clipping_norm: float,
                 seed: int | None = None, canaries: int = 0, canary_seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if noise_multiplier < 0 or not 0 < clipping_norm:
            raise ValueError("noise_multiplier must be >= 0 and clipping_norm > 0")
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.seed = seed
        self.releases = 0  # names each release's seeded noise
        self.contributors: list[int] = []  # clients in the current buffer
        self.unclipped = 0
        self.last_metrics: dict[str, float] = {}
        self.canary_seed = canary_seed
        self.canary_inserted = canary_inserted(canary_seed, canaries)
        self.shadow: NDArrays = {}  # with canaries: the shadow release's floating arrays
        self.inserted_canaries: NDArrays = {}  # C times the inserted canaries' directions, summed

    def __repr__(self) -> str:
        return (f"DPFedBuff(K={self.buffer_size}, sigma={self.noise_multiplier}, "
                f"C={self.clipping_norm}, lr={self.server_lr})")

    def prepare(self, start: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
                ) -> NDArrays:
        """The client's floating update, clipped to ``C`` (Flower's clipping helper)."""
        names = [name for name in start if np.issubdtype(start[name].dtype, np.floating)]
        update = [trained[name].astype(np.float64) - start[name] for name in names]
        norm = get_norm(update)
        if norm > 0:  # Flower's helper divides by the norm (a zero update stays zero)
            clip_inputs_inplace(update, self.clipping_norm)
        kept = dict(zip(names, update, strict=True))
        kept[_UNCLIPPED] = np.array([float(norm <= self.clipping_norm)])
        return kept

    def refuses(self, client: int) -> str:
        if client in self.contributors:
            return ("central DP: one update per client per buffer release (this client's "
                    "update is already in the buffer)")
        return ""

    def receive(self, kept: Mapping[str, np.ndarray], staleness: int, weight: float,
                client: int = -1) -> bool:
        update = dict(kept)
        self.unclipped += int(update.pop(_UNCLIPPED)[0])
        self.contributors.append(int(client))
        return super().receive(update, staleness, weight)

    def _noise(self) -> np.random.Generator | SecureRandom:
        if self.seed is None:
            return SecureRandom()
        return np.random.default_rng([self.seed, _RELEASE_NOISE, self.releases])

    def release(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        """``x + server_lr (sum + N(0, sigma^2 C^2)) / K`` on the floating arrays."""
        std = self.noise_multiplier * self.clipping_norm
        rng = self._noise()
        new = dict(current)
        canaries = self._canaries(current) if len(self.canary_inserted) else {}
        for name, total in self.buffer.items():
            noised = total + rng.normal(0.0, std, total.shape) if std else total
            new[name] = current[name] + self.server_lr * noised / self.buffer_size
            if canaries:  # the shadow release: the same step with the canaries added
                shadow = self.shadow.get(name, np.asarray(current[name], dtype=np.float64))
                self.shadow[name] = (shadow + self.server_lr * (noised + canaries[name])
                                     / self.buffer_size)
        self.last_metrics = {CLIP_NORM: self.clipping_norm, NOISE_STD: std / self.buffer_size,
                             COHORT: self.buffered, UNCLIPPED: self.unclipped}
        self.buffer, self.buffered, self.contributors, self.unclipped = {}, 0, [], 0
        self.releases += 1
        return same_dtype(new, current)

    def release_metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

    def _canaries(self, current: Mapping[str, np.ndarray]) -> NDArrays:
        """``C · Σ u_i`` over the inserted canaries, shaped like the floating arrays of
        ``current`` (in their order, as ``fedtune.audit`` flattens them); drawn once."""
        if not self.inserted_canaries:
            names = [n for n in current if np.issubdtype(current[n].dtype, np.floating)]
            parts = canary_sum(self.canary_seed, np.flatnonzero(self.canary_inserted),
                               self.clipping_norm,
                               [np.zeros(current[name].shape) for name in names])
            self.inserted_canaries = dict(zip(names, parts, strict=True))
        return self.inserted_canaries

    def canary_release(self) -> dict[str, np.ndarray]:
        """The shadow release's floating arrays by name (what an observer of a run with the
        canary clients would see); empty without canaries or before the first release."""
        return dict(self.shadow)

