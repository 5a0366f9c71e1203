"""DP-FedAvg: federated averaging with user-level differential privacy.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR): every round each client joins independently with probability ``q`` (Poisson
sampling), each update ``Δ_k = w_k - w`` is clipped to L2 norm ``C``, Gaussian noise
``N(0, σ²C²)`` is added to the sum, and the sum is divided by the *expected* cohort size
``qN`` (the fixed-denominator estimator: its sensitivity is ``C / qN`` whoever was sampled,
so an empty or small cohort still releases a correctly noised update).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", NeurIPS): the server also counts the updates that were not clipped,
noises the count (std ``σ_b``) and moves the bound geometrically towards the
``target_quantile`` of update norms, ``C ← C · exp(-η (b̄ - γ))``. The update noise is then
raised to ``σ_Δ = (σ⁻² - (2σ_b)⁻²)^(-1/2)`` so that both releases together cost what one
Gaussian mechanism with ``σ`` costs (their Theorem 1).

Clipping and the noise parameters use Flower's own helpers
(``flwr.supercore.differential_privacy``); Flower's ``DifferentialPrivacyServerSideFixedClipping``
is the reference for the mechanics, but it samples a fixed number of clients and averages over
the replies it got, which is why its accountant has no subsampling amplification.

Distributed DP (``client_noise=True``, for secure aggregation): each client clips its own update
to ``C`` and adds its share of the noise before its update is masked, so the sum the server
unmasks already carries ``N(0, σ²C²)`` (at least: the shares are sized for the fewest clients
whose inputs a round accepts); the server only sums and divides by ``qN``. The accountant is the
same; the trust moves from "the server noises honestly" to "the clients do" (and the server
learns nothing but the noised sum).

The noise comes from a generator seeded with ``(seed, round)`` so simulations repeat exactly; a
deployment that needs a cryptographic guarantee must pass ``seed=None`` (fresh OS entropy).
Only floating-point arrays are clipped, noised and averaged; integer buffers keep the server's
values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import (
    clip_inputs_inplace,
    compute_adaptive_noise_params,
    get_norm,
)


class DPFedAvg(FedAvg):
    """FedAvg with Poisson client sampling, per-update clipping and Gaussian noise.

    Parameters
    ----------
    sample_rate : float
        Probability ``q`` with which each client joins a round.
    noise_multiplier : float
        ``σ``: the noise std on the sum of updates is ``σ · C``.
    clipping_norm : float
        ``C``, the L2 bound of each client's update (the starting bound when adaptive).
    adaptive : bool
        Adapt ``C`` after every round (Andrew et al. 2021).
    target_quantile, clip_learning_rate : float
        ``γ`` and ``η`` of the adaptive rule.
    clipped_count_stddev : float or None
        ``σ_b``; None = expected cohort / 20, as Andrew et al. recommend.
    seed : int or None
        Seeds client sampling and noise per round; None draws fresh entropy.
    client_noise : bool
        Distributed DP: the replies were clipped and noised by the clients (and summed under
        secure aggregation); aggregation neither clips nor adds noise.
    """

    def __init__(self, *, sample_rate: float, noise_multiplier: float, clipping_norm: float,
                 adaptive: bool = False, target_quantile: float = 0.5,
                 clip_learning_rate: float = 0.2, clipped_count_stddev: float | None = None,
                 seed: int | None = 0, client_noise: bool = False, **fedavg_args) -> None:
        super().__init__(fraction_train=sample_rate, **fedavg_args)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError("noise_multiplier must be >= 0 and clipping_norm > 0")
        self.sample_rate = sample_rate
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.clipped_count_stddev = clipped_count_stddev
        self.seed = seed
        self.client_noise = client_noise
        if client_noise and adaptive:
            raise ValueError("adaptive clipping needs the unclipped count: not with client_noise")
        self.current_arrays = ArrayRecord()
        self.population = 0

    def __repr__(self) -> str:
        return (f"DPFedAvg(q={self.sample_rate}, sigma={self.noise_multiplier}, "
                f"C={self.clipping_norm}, adaptive={self.adaptive})")

    def _rng(self, server_round: int, stream: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, server_round, stream])

    def expected_cohort(self) -> float:
        return self.sample_rate * self.population

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Poisson sampling: every node joins with probability ``sample_rate``."""
        self.current_arrays = arrays
        node_ids = sorted(grid.get_node_ids())
        self.population = len(node_ids)
        draws = self._rng(server_round, 0).random(len(node_ids))
        chosen = [node for node, u in zip(node_ids, draws, strict=True) if u < self.sample_rate]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def noise_parameters(self) -> tuple[float, float]:
        """(σ_Δ for the update sum, σ_b for the unclipped count)."""
        if not self.adaptive:
            return self.noise_multiplier, 0.0
        if self.noise_multiplier == 0:
            return 0.0, 0.0
        count_std, update_noise = compute_adaptive_noise_params(
            self.noise_multiplier, self.expected_cohort(), self.clipped_count_stddev)
        return update_noise, count_std

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every update, sum, add noise, divide by the expected cohort size."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        names = list(self.current_arrays.keys())
        current = [self.current_arrays[name].numpy() for name in names]
        floating = [np.issubdtype(a.dtype, np.floating) for a in current]
        total = [np.zeros(a.shape, dtype=np.float64) for a, f in zip(current, floating) if f]
        unclipped = 0
        for reply in valid:
            arrays = reply.content[self.arrayrecord_key]
            update = [arrays[name].numpy().astype(np.float64) - a
                      for name, a, f in zip(names, current, floating, strict=True) if f]
            if not self.client_noise:  # distributed DP: the client clipped already
                unclipped += get_norm(update) <= self.clipping_norm
                clip_inputs_inplace(update, self.clipping_norm)
            for acc, part in zip(total, update, strict=True):
                acc += part
        update_noise, count_std = (0.0, 0.0) if self.client_noise else self.noise_parameters()
        rng = self._rng(server_round, 1)
        denominator = self.expected_cohort()
        new_arrays, position = {}, 0
        for name, array, is_float in zip(names, current, floating, strict=True):
            if not is_float:
                new_arrays[name] = Array(array)
                continue
            noisy = total[position] + rng.normal(0.0, update_noise * self.clipping_norm,
                                                 array.shape)
            new_arrays[name] = Array((array + noisy / denominator).astype(array.dtype))
            position += 1
        clip_used = self.clipping_norm
        if self.adaptive:
            noisy_share = (unclipped + rng.normal(0.0, count_std)) / denominator
            self.clipping_norm *= math.exp(-self.clip_learning_rate
                                           * (noisy_share - self.target_quantile))
        metrics = MetricRecord({"dp-clip-norm": clip_used, "dp-cohort": len(valid)})
        if not self.client_noise:
            metrics["dp-unclipped"] = unclipped
        if valid:
            train_metrics = self.train_metrics_aggr_fn([r.content for r in valid],
                                                       self.weighted_by_key)
            metrics.update(train_metrics)
        return ArrayRecord(new_arrays), metrics
