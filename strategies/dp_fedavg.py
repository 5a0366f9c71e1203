"""DP-FedAvg: federated averaging with user-level differential privacy, and the server
optimizers practitioners run on its noised mean (DP-FedAvgM, DP-FedAdam).

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR): every round each client joins independently with probability ``q`` (Poisson
sampling), each update ``Δ_k = w_k - w`` is clipped to L2 norm ``C``, Gaussian noise
``N(0, σ²C²)`` is added to the sum, and the sum is divided by the *expected* cohort size
``qN`` (the fixed-denominator estimator: its sensitivity is ``C / qN`` whoever was sampled,
so an empty or small cohort still releases a correctly noised update).

Server optimizer on the noised mean ``Δ̄`` (post-processing: it costs no privacy; Kairouz et
al. 2021, "Advances and Open Problems in Federated Learning", sec. 4.3; Reddi et al. 2021,
"Adaptive Federated Optimization"): ``sgd`` with server learning rate ``η`` and momentum ``β``
(``m ← βm + Δ̄; w ← w + ηm``, DP-FedAvgM; η = 1, β = 0 is plain DP-FedAvg) or ``adam``
(``m ← β₁m + (1-β₁)Δ̄; v ← β₂v + (1-β₂)Δ̄²; w ← w + η_t m / (√v + τ)``, DP-FedAdam, with the
bias-corrected rate η_t of Flower's ``FedAdam`` so that σ = 0 and C = ∞ give exactly Flower's
FedAdam and FedAvgM). Flower's own FedAvgM and FedAdam apply their optimizer inside their own
example-weighted averaging, which cannot take the clipped, noised, fixed-denominator mean, so
the two update rules are written out here.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", NeurIPS): the server also counts the updates that were not clipped,
noises the count (std ``σ_b``) and moves the bound geometrically towards the
``target_quantile`` of update norms, ``C ← C · exp(-η_C (b̄ - γ))``. The count is *centred*:
each sampled client adds ``b_i - 1/2`` (``b_i`` = 1 if its update was not clipped), so adding
or removing one client moves it by at most ``COUNT_SENSITIVITY`` = 1/2, as TensorFlow Privacy's
``QuantileEstimatorQuery`` does; the estimate is ``b̄ = 1/2 + (Σ (b_i - 1/2) + N(0, σ_b²)) / qN``.
The update noise is raised to ``σ_Δ = (σ⁻² - (2σ_b)⁻²)^(-1/2)`` so that both releases together
are one Gaussian mechanism of multiplier ``σ`` on the vector (update sum / C, count / (1/2))
(their Theorem 1). Centring is what makes that split hold: an uncentred count has sensitivity 1
and the same split would release a mechanism of multiplier ``(σ_Δ⁻² + σ_b⁻²)^(-1/2) < σ``.
Centring also costs less than accounting an uncentred count at sensitivity 1: for the same noise
on ``b̄`` it spends a quarter of the privacy budget. ``count_share`` is the share ``s`` of the
budget (of ``σ⁻²``, which is how Gaussian mechanisms compose in Rényi DP) the count takes:
``σ_b = σ / (2√s)``, ``σ_Δ = σ / √(1 - s)`` (``adaptive_noise``).

Canary clients for an empirical privacy estimate (Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar 2024, "One-shot Empirical Privacy Estimation for Federated Learning", ICLR):
``canaries`` extra clients, each with a fixed random unit direction ``u_i`` over the floating
arrays; half of them (``canary_inserted``) join every round with probability ``q`` like any
client and send ``C · u_i`` (an update that clipping leaves as it is). They are not counted
in the population, the cohort, the unclipped count or any metric: the guarantee of the real
clients is unchanged. Unlike the paper, whose canaries enter the trained model, their updates
go into a *shadow release* only (``canary_release``): the same clipped sum and the same noise
plus the canaries, stepped by its own copy of the server optimizer. It is the model the server
would release had the canary clients taken part, given the honest clients' updates (computed
on the reported model), so the reported model and its accuracy are exactly those of a run
without the audit; in a small model (a 770-weight head) hundreds of inserted random
directions would otherwise move it measurably. After the run, the cosine of the shadow
release's delta with each ``u_i`` separates inserted from held-out canaries
(``fedtune.audit``).

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

Secrecy of the draws (``strategies.noise``): the noise and the Poisson sampling of each round
come from ``SecureRandom`` (ChaCha20 keyed by OS entropy on every draw) unless ``seed`` is given,
which selects NumPy generators seeded with ``(seed, round, stream)`` - reproducible and *not
private*, since whoever knows the seed can rebuild the noise and which clients were sampled.
The canaries' directions, which half of them is inserted and when they are sampled come from
``canary_seed`` in either mode: they are the auditor's own test inputs, enter only the shadow
release and never the reported model, so knowing them tells nothing about any real client.
Only floating-point arrays are clipped, noised and averaged; integer buffers keep the server's
values.

Metrics of every round (the strategy's MetricRecord): ``dp-clip-norm`` (the bound used),
``dp-noise-std`` (std of the noise on each coordinate of the mean update), ``dp-cohort``
(sound replies), ``dp-clipped-fraction`` (with adaptive clipping: the share of clipped updates
computed from the *noised* count the mechanism releases), ``dp-unclipped`` (the exact count, a
simulation diagnostic that a deployment must not publish) and ``dp-canaries`` (canary updates
added).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from strategies.noise import SecureRandom

SERVER_OPTIMIZERS = ("sgd", "adam")

# the strategy's metric keys
CLIP_NORM = "dp-clip-norm"
NOISE_STD = "dp-noise-std"
COHORT = "dp-cohort"
UNCLIPPED = "dp-unclipped"
CLIPPED_FRACTION = "dp-clipped-fraction"
CANARY_UPDATES = "dp-canaries"

_SAMPLING, _NOISE, _CANARY_SAMPLING = range(3)  # random streams of a round
_CANARY_DIRECTION = 7919  # seeds canary i's direction as [seed, _CANARY_DIRECTION, i]

# how far adding or removing one client moves the centred unclipped count (each adds b - 1/2)
COUNT_SENSITIVITY = 0.5
# automatic count noise: Andrew et al.'s std (expected cohort / 20) unless it takes more than
# this share of the budget; then this share (the update noise grows by 1/sqrt(1 - share))
MAX_AUTOMATIC_COUNT_SHARE = 0.1


def count_share(noise_multiplier: float, count_stddev: float) -> float:
    """The share of the budget (of σ⁻²) a centred count with noise std ``count_stddev``
    takes: ``(σ / (2 σ_b))²`` (at least 1 means no budget is left for the update)."""
    return (noise_multiplier * COUNT_SENSITIVITY / count_stddev) ** 2


def automatic_count_stddev(noise_multiplier: float, expected_cohort: float) -> float:
    """σ_b when none is given: Andrew et al.'s expected cohort / 20 (a std of 0.05 on the
    estimated unclipped share), raised until the count takes at most
    ``MAX_AUTOMATIC_COUNT_SHARE`` of the budget (small cohorts, large σ)."""
    capped = noise_multiplier * COUNT_SENSITIVITY / math.sqrt(MAX_AUTOMATIC_COUNT_SHARE)
    return max(expected_cohort / 20, capped)


def adaptive_noise(noise_multiplier: float, expected_cohort: float,
                   count_stddev: float | None = None, share: float = 0.0
                   ) -> tuple[float, float]:
    """(σ_Δ on the update sum, σ_b on the centred unclipped count) that together cost one
    Gaussian mechanism of ``noise_multiplier`` (Andrew et al. 2021, Theorem 1): the count takes
    ``share`` of the budget if given, else the share its std ``count_stddev`` implies (None:
    ``automatic_count_stddev``). Raises ``ValueError`` when the count would take it all."""
    if noise_multiplier == 0:
        return 0.0, 0.0
    if share:
        count_std = noise_multiplier * COUNT_SENSITIVITY / math.sqrt(share)
    else:
        count_std = count_stddev or automatic_count_stddev(noise_multiplier, expected_cohort)
    taken = count_share(noise_multiplier, count_std)
    if taken >= 1:
        raise ValueError(f"a count noise std of {count_std:g} takes all of noise multiplier "
                         f"{noise_multiplier:g}: it must be > noise / 2")
    return noise_multiplier / math.sqrt(1 - taken), float(count_std)


def canary_inserted(seed: int, count: int) -> np.ndarray:
    """Which of ``count`` canary clients take part (exactly half, chosen from ``seed``)."""
    inserted = np.zeros(count, dtype=bool)
    rng = np.random.default_rng([seed, _CANARY_DIRECTION])
    inserted[rng.permutation(count)[:count // 2]] = True
    return inserted


def canary_direction(seed: int, index: int, size: int) -> np.ndarray:
    """Canary ``index``'s unit direction over ``size`` floating coordinates (uniform on the
    sphere: a normalised standard normal vector)."""
    vector = np.random.default_rng([seed, _CANARY_DIRECTION, index]).standard_normal(size)
    return vector / np.linalg.norm(vector)


def canary_sum(seed: int, indices: Iterable[int], clipping_norm: float,
               like: list[np.ndarray]) -> list[np.ndarray]:
    """``C · u_i`` summed over the canaries ``indices``, laid out over arrays shaped like
    ``like`` (in their order, as ``fedtune.audit`` flattens them)."""
    total = [np.zeros_like(part) for part in like]
    sizes = [part.size for part in total]
    for index in indices:
        direction = canary_direction(seed, int(index), sum(sizes))
        for part, piece in zip(total, np.split(direction, np.cumsum(sizes)[:-1]), strict=True):
            part += clipping_norm * piece.reshape(part.shape)
    return total


class DPFedAvg(FedAvg):
    """FedAvg with Poisson client sampling, per-update clipping, Gaussian noise and a server
    optimizer on the noised mean.

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
        ``γ`` and ``η_C`` of the adaptive rule.
    clipped_count_stddev : float or None
        ``σ_b``; None = ``automatic_count_stddev`` (unless ``count_share`` is given).
    count_share : float
        Share of the budget the count takes (0 = from ``clipped_count_stddev``).
    server_optimizer : str
        ``"sgd"`` (learning rate and momentum) or ``"adam"``.
    server_learning_rate, server_momentum : float
        ``η`` and ``β`` (``sgd``), ``η`` (``adam``).
    adam_betas : tuple of float
        ``(β₁, β₂)`` of ``adam``.
    adam_tau : float
        ``τ`` of ``adam`` (Reddi et al. 2021).
    canaries : int
        Canary clients for an empirical privacy estimate (0 = none).
    canary_seed : int
        Seeds the canaries' directions and which half is inserted.
    seed : int or None
        None (the default): client sampling and noise from ``SecureRandom``; an int seeds
        them per round - reproducible, and not private.
    client_noise : bool
        Distributed DP: the replies were clipped and noised by the clients (and summed under
        secure aggregation); aggregation neither clips nor adds noise.
    """

    def __init__(self, *, sample_rate: float, noise_multiplier: float, clipping_norm: float,
                 adaptive: bool = False, target_quantile: float = 0.5,
                 clip_learning_rate: float = 0.2, clipped_count_stddev: float | None = None,
                 count_share: float = 0.0,
                 server_optimizer: str = "sgd", server_learning_rate: float = 1.0,
                 server_momentum: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.99),
                 adam_tau: float = 1e-3, canaries: int = 0, canary_seed: int = 0,
                 seed: int | None = None, client_noise: bool = False,
                 **fedavg_args) -> None:
        super().__init__(fraction_train=sample_rate, **fedavg_args)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError("noise_multiplier must be >= 0 and clipping_norm > 0")
        if server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}")
        if canaries and not math.isfinite(clipping_norm):
            raise ValueError("canaries need a finite clipping_norm (they send C times a "
                             "unit direction)")
        self.sample_rate = sample_rate
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.clipped_count_stddev = clipped_count_stddev
        self.count_share = count_share
        self.server_optimizer = server_optimizer
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.adam_betas = tuple(adam_betas)
        self.adam_tau = adam_tau
        self.canary_seed = canary_seed
        self.canary_inserted = canary_inserted(canary_seed, canaries)
        self.seed = seed
        self.client_noise = client_noise
        if client_noise and adaptive:
            raise ValueError("adaptive clipping needs the unclipped count: not with client_noise")
        self.current_arrays = ArrayRecord()
        self.population = 0
        # the server optimizer's state, one array per floating array (empty before round 1)
        self.first_moment: list[np.ndarray] = []
        self.second_moment: list[np.ndarray] = []
        # with canaries: the shadow release's floating arrays and its optimizer's state
        self.shadow: list[np.ndarray] = []
        self.shadow_first_moment: list[np.ndarray] = []
        self.shadow_second_moment: list[np.ndarray] = []

    def __repr__(self) -> str:
        return (f"DPFedAvg(q={self.sample_rate}, sigma={self.noise_multiplier}, "
                f"C={self.clipping_norm}, adaptive={self.adaptive}, "
                f"server={self.server_optimizer}, lr={self.server_learning_rate})")

    def _rng(self, server_round: int, stream: int) -> np.random.Generator | SecureRandom:
        """The draws of one round's sampling or noise: secret unless a seed was given."""
        if self.seed is None:
            return SecureRandom()
        return np.random.default_rng([self.seed, server_round, stream])

    def expected_cohort(self) -> float:
        return self.sample_rate * self.population

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Poisson sampling: every node joins with probability ``sample_rate``."""
        self.current_arrays = arrays
        node_ids = sorted(grid.get_node_ids())
        self.population = len(node_ids)
        draws = self._rng(server_round, _SAMPLING).random(len(node_ids))
        chosen = [node for node, u in zip(node_ids, draws, strict=True) if u < self.sample_rate]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def noise_parameters(self) -> tuple[float, float]:
        """(σ_Δ for the update sum, σ_b for the centred unclipped count)."""
        if not self.adaptive:
            return self.noise_multiplier, 0.0
        return adaptive_noise(self.noise_multiplier, self.expected_cohort(),
                              self.clipped_count_stddev, self.count_share)

    def _canary_sum(self, server_round: int, like: list[np.ndarray]) -> tuple[list[np.ndarray],
                                                                             int]:
        """The sum of ``C · u_i`` over the inserted canaries Poisson sampling picks this
        round, shaped like ``like``, and how many there were."""
        draws = np.random.default_rng([self.canary_seed, server_round, _CANARY_SAMPLING]).random(
            len(self.canary_inserted))
        sampled = np.flatnonzero(self.canary_inserted & (draws < self.sample_rate))
        return canary_sum(self.canary_seed, sampled, self.clipping_norm, like), len(sampled)

    def _server_step(self, server_round: int, mean: list[np.ndarray],
                     first: list[np.ndarray], second: list[np.ndarray]
                     ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(step, first moment, second moment): the server optimizer's step from the noised
        mean update (float64) and its new state."""
        if not first:
            first = [np.zeros_like(m) for m in mean]
            second = ([np.zeros_like(m) for m in mean]
                      if self.server_optimizer == "adam" else [])
        if self.server_optimizer == "sgd":
            first = [self.server_momentum * m + d for m, d in zip(first, mean, strict=True)]
            return [self.server_learning_rate * m for m in first], first, second
        beta_1, beta_2 = self.adam_betas
        first = [beta_1 * m + (1 - beta_1) * d for m, d in zip(first, mean, strict=True)]
        second = [beta_2 * v + (1 - beta_2) * d * d for v, d in zip(second, mean, strict=True)]
        # Flower FedAdam's bias-corrected rate (Kingma & Ba 2015, with t = server_round + 1)
        rate = (self.server_learning_rate * math.sqrt(1 - beta_2 ** (server_round + 1))
                / (1 - beta_1 ** (server_round + 1)))
        step = [rate * m / (np.sqrt(v) + self.adam_tau) for m, v in zip(first, second,
                                                                         strict=True)]
        return step, first, second

    def canary_release(self) -> dict[str, np.ndarray]:
        """The shadow release's floating arrays by name (what an observer of a run with the
        canary clients would see); empty without canaries or before round 1."""
        names = [name for name in self.current_arrays.keys()
                 if np.issubdtype(self.current_arrays[name].numpy().dtype, np.floating)]
        return dict(zip(names, self.shadow, strict=True)) if self.shadow else {}

    def _step_shadow(self, server_round: int, current: list[np.ndarray],
                     mean: list[np.ndarray], canaries: list[np.ndarray]) -> None:
        """The shadow release: the noised mean plus the canaries' share, stepped by its own
        server optimizer state."""
        if not self.shadow:
            self.shadow = [np.asarray(a, dtype=np.float64).copy() for a in current]
        with_canaries = [m + c / self.expected_cohort() for m, c in zip(mean, canaries,
                                                                        strict=True)]
        step, self.shadow_first_moment, self.shadow_second_moment = self._server_step(
            server_round, with_canaries, self.shadow_first_moment, self.shadow_second_moment)
        self.shadow = [s + d for s, d in zip(self.shadow, step, strict=True)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every update, sum, add noise, divide by the expected cohort size, and let the
        server optimizer step on that mean (with canaries: also the shadow release)."""
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
                norm = get_norm(update)
                unclipped += norm <= self.clipping_norm
                if norm > 0:  # Flower's helper divides by the norm (a zero update stays zero)
                    clip_inputs_inplace(update, self.clipping_norm)
            for acc, part in zip(total, update, strict=True):
                acc += part
        update_noise, count_std = (0.0, 0.0) if self.client_noise else self.noise_parameters()
        noise_std = update_noise * self.clipping_norm if update_noise else 0.0
        rng = self._rng(server_round, _NOISE)
        denominator = self.expected_cohort()
        mean = [(part + rng.normal(0.0, noise_std, part.shape)) / denominator for part in total]
        canary_updates = 0
        if len(self.canary_inserted):
            canaries, canary_updates = self._canary_sum(server_round, total)
            self._step_shadow(server_round, [a for a, f in zip(current, floating) if f],
                              mean, canaries)
        step, self.first_moment, self.second_moment = self._server_step(
            server_round, mean, self.first_moment, self.second_moment)
        steps = iter(step)
        new_arrays = {}
        for name, array, is_float in zip(names, current, floating, strict=True):
            new_arrays[name] = (Array((array + next(steps)).astype(array.dtype)) if is_float
                                else Array(array))
        metrics = MetricRecord({CLIP_NORM: self.clipping_norm,
                                NOISE_STD: noise_std / denominator if denominator else 0.0,
                                COHORT: len(valid), UNCLIPPED: unclipped,
                                CANARY_UPDATES: canary_updates})
        if self.adaptive:  # the centred count: each client adds b_i - 1/2
            centred = unclipped - COUNT_SENSITIVITY * len(valid)
            noisy_share = 0.5 + (centred + rng.normal(0.0, count_std)) / denominator
            metrics[CLIPPED_FRACTION] = float(1.0 - noisy_share)
            self.clipping_norm *= math.exp(-self.clip_learning_rate
                                           * (noisy_share - self.target_quantile))
        if self.client_noise:  # the server saw only the sum: it counted no clipping
            del metrics[UNCLIPPED]
        if valid:
            train_metrics = self.train_metrics_aggr_fn([r.content for r in valid],
                                                       self.weighted_by_key)
            metrics.update(train_metrics)
        return ArrayRecord(new_arrays), metrics
