"""The statistics of the two audits; pure math (numpy, scipy).

**One-shot estimate from canary cosines** (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar
2024, "One-shot Empirical Privacy Estimation for Federated Learning", ICLR). The cosine of the
final model delta with a canary's direction is, in high dimension, Gaussian: around 0 for a
held-out canary, shifted for an inserted one. Fitting N(μ₀, s₀²) to the held-out cosines and
N(μ₁, s₁²) to the inserted ones, the estimate is the ε at which the mechanism that releases one
of the two Gaussians is (ε, δ)-DP (``epsilon_two_gaussians``): the privacy profile
δ(ε) = P_Q[L > ε] - e^ε P_P[L > ε] with L = log(q/p), a quadratic in the observation, taken in
both directions (Steinke 2022, "Composition of Differential Privacy & Privacy Amplification by
Subsampling", sec. on the privacy loss). The paper's null is the analytic N(0, 1/d) of a random
direction in d dimensions (its variance is exactly 1/d; the Gaussian shape is the paper's
high-dimensional approximation), which is the main estimate here; the null fitted to the
held-out canaries gives a second one. It is an *estimate* of the ε an adversary who sees only
the final model faces, not a bound; its confidence interval comes from resampling the canaries
(bootstrap). With few canaries the fitted standard deviation is noisy, and any difference of
variances makes the privacy loss grow in the tails: without any signal, 50 inserted canaries
estimate ε ≈ 1.7 (median; 250: 0.6; 500: 0.4), so audit with hundreds of canaries.

**One-run lower bound** (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS). Each of m canaries is included independently with probability 1/2;
the auditor guesses "in" for the r₊ highest scores and "out" for the r₋ lowest and abstains
on the rest. If the algorithm is (ε, δ)-DP, the number of correct guesses among r = r₊ + r₋
is, up to a δ term, stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) (their Theorem
5.2): P[W ≥ v] ≤ P[Bin(r, p) ≥ v] + 2mδ max_{1≤i≤v} P[v - i ≤ Bin(r, p) < v] / i. The
largest ε whose p-value is below 1 - confidence is an ε lower bound at that confidence. The
theorem assumes independent fair coins; canaries included as a uniformly random *half* (the
canary clients of DP-FedAvg) are that design conditioned on exactly ⌊m/2⌋ heads, an event of
probability P[Bin(m, 1/2) = ⌊m/2⌋] (0.025 for m = 1000), and a probability under a condition is
at most the unconditioned one divided by the condition's: each test then runs at that much
smaller error level (``one_run_audit(..., exactly_half=True)``), which keeps the bound valid and
costs some power.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special, stats

_LOG_ZERO = -1e4  # log of a probability that is zero (keeps root finding finite)


def _log_mass_above(t: float, mu: float, sd: float) -> float:
    return float(special.log_ndtr((mu - t) / sd))


def _log_mass_below(t: float, mu: float, sd: float) -> float:
    return float(special.log_ndtr((t - mu) / sd))


def _log_mass_between(lo: float, hi: float, mu: float, sd: float) -> float:
    """log P[lo < X < hi] for X ~ N(mu, sd²), computed on the side of the smaller tail."""
    if hi <= lo:
        return _LOG_ZERO
    if (lo - mu) > 0:  # both bounds in the upper tail: P[X > lo] - P[X > hi]
        upper, lower = _log_mass_above(lo, mu, sd), _log_mass_above(hi, mu, sd)
    else:
        upper, lower = _log_mass_below(hi, mu, sd), _log_mass_below(lo, mu, sd)
    if lower >= upper:
        return _LOG_ZERO
    return upper + math.log1p(-math.exp(lower - upper))


def _log_mass(region: tuple[str, float, float], mu: float, sd: float) -> float:
    kind, a, b = region
    if kind == "empty":
        return _LOG_ZERO
    if kind == "all":
        return 0.0
    if kind == "above":
        return _log_mass_above(a, mu, sd)
    if kind == "below":
        return _log_mass_below(a, mu, sd)
    if kind == "between":
        return _log_mass_between(a, b, mu, sd)
    return float(np.logaddexp(_log_mass_below(a, mu, sd), _log_mass_above(b, mu, sd)))


def _loss_above(eps: float, p: tuple[float, float], q: tuple[float, float]
                ) -> tuple[str, float, float]:
    """The set {x : log q(x) - log p(x) > eps} for Gaussians p = (μ, s), q = (μ, s)."""
    (mu0, s0), (mu1, s1) = p, q
    a = 0.5 / s0**2 - 0.5 / s1**2
    b = mu1 / s1**2 - mu0 / s0**2
    c = 0.5 * (mu0 / s0) ** 2 - 0.5 * (mu1 / s1) ** 2 + math.log(s0 / s1) - eps
    if abs(a) < 1e-12 * max(1 / s0**2, 1 / s1**2):  # equal variances: a half-line
        if b == 0:
            return ("all", 0.0, 0.0) if c > 0 else ("empty", 0.0, 0.0)
        return ("above", -c / b, 0.0) if b > 0 else ("below", -c / b, 0.0)
    disc = b * b - 4 * a * c
    if disc <= 0:
        return ("all", 0.0, 0.0) if a > 0 else ("empty", 0.0, 0.0)
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    return ("outside", r1, r2) if a > 0 else ("between", r1, r2)


def log_delta_one_way(eps: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """log δ(ε) of telling Q from P: log(Q[L > ε] - e^ε P[L > ε]), L = log(q/p)."""
    region = _loss_above(eps, p, q)
    log_q, log_p = _log_mass(region, *q), _log_mass(region, *p)
    if log_q <= _LOG_ZERO:
        return _LOG_ZERO
    gap = eps + log_p - log_q
    if gap >= 0:
        return _LOG_ZERO
    return log_q + math.log1p(-math.exp(gap))


def epsilon_two_gaussians(null: tuple[float, float], alternative: tuple[float, float],
                          delta: float) -> float:
    """The ε at which releasing N(μ₀, s₀²) or N(μ₁, s₁²) is (ε, δ)-DP (both directions)."""
    if min(null[1], alternative[1]) <= 0:
        raise ValueError("both Gaussians need a positive standard deviation")
    target = math.log(delta)

    def excess(eps: float) -> float:
        return max(log_delta_one_way(eps, null, alternative),
                   log_delta_one_way(eps, alternative, null)) - target

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        low, high = high, 2 * high
        if high > 1e4:
            return math.inf
    return float(optimize.brentq(excess, low, high, xtol=1e-6))


@dataclass(frozen=True)
class CanaryEstimate:
    """The one-shot estimate from inserted and held-out canary cosines."""

    epsilon: float  # null N(0, 1/dimension) as in the paper (held-out fit without dimension)
    ci_low: float
    ci_high: float
    confidence: float
    null: str  # "analytic N(0, 1/d)" or "held-out canaries"
    epsilon_held_out_null: float  # the same with the null fitted to the held-out canaries
    inserted_mean: float
    inserted_std: float
    held_out_mean: float
    held_out_std: float
    inserted: int
    held_out: int

    def to_dict(self) -> dict:
        return asdict(self)


def _fit(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def canary_epsilon(inserted: Sequence[float], held_out: Sequence[float], delta: float,
                   dimension: int | None = None, confidence: float = 0.95,
                   resamples: int = 400, seed: int = 0) -> CanaryEstimate:
    """ε from canary statistics (higher for inserted canaries), with a bootstrap interval
    (the canaries resampled with replacement, ``resamples`` times).

    With ``dimension`` the null is the paper's: the cosine of a direction drawn independently
    of the release has mean 0 and variance exactly 1/d, so only the inserted canaries are
    fitted (and resampled); the held-out canaries then check that null and give a second
    estimate. Without it the null is fitted to the held-out canaries."""
    ins, out = np.asarray(inserted, dtype=float), np.asarray(held_out, dtype=float)
    if len(ins) < 2 or len(out) < 2:
        raise ValueError("need at least two inserted and two held-out canaries")
    analytic = (0.0, dimension ** -0.5) if dimension else None
    rng = np.random.default_rng(seed)

    def estimate(ins_sample: np.ndarray, out_sample: np.ndarray) -> float:
        null = analytic if analytic else _fit(out_sample)
        return epsilon_two_gaussians(null, _fit(ins_sample), delta)

    point = estimate(ins, out)
    draws = [estimate(rng.choice(ins, len(ins)), rng.choice(out, len(out)))
             for _ in range(resamples)]
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return CanaryEstimate(point, float(low), float(high), confidence,
                          "analytic N(0, 1/d)" if analytic else "held-out canaries",
                          epsilon_two_gaussians(_fit(out), _fit(ins), delta), *_fit(ins),
                          *_fit(out), len(ins), len(out))


def gaussian_separation(epsilon: float, delta: float) -> float:
    """μ at which releasing N(0, 1) or N(μ, 1) is exactly (ε, δ)-DP (the Gaussian mechanism of
    sensitivity / noise μ; Balle & Wang 2018)."""
    if epsilon_two_gaussians((0.0, 1.0), (1e-9, 1.0), delta) >= epsilon:
        return 0.0
    high = 1.0
    while epsilon_two_gaussians((0.0, 1.0), (high, 1.0), delta) < epsilon:
        high *= 2
    return float(optimize.brentq(
        lambda mu: epsilon_two_gaussians((0.0, 1.0), (mu, 1.0), delta) - epsilon,
        0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class EstimateReference:
    """What the one-shot estimate reads, at a run's canary count, for a mechanism whose ε is
    known: the estimate's median and central 95 % over simulated runs."""

    epsilon: float  # the simulated mechanism's ε
    separation: float  # its inserted canaries' mean cosine, in null standard deviations
    median: float
    low: float  # 2.5 % quantile of the estimates
    high: float  # 97.5 % quantile
    inserted: int
    draws: int

    def to_dict(self) -> dict:
        return asdict(self)


def canary_estimate_reference(epsilon: float, delta: float, inserted: int, draws: int = 400,
                              seed: int = 0) -> EstimateReference:
    """The sampling distribution of ``canary_epsilon`` (analytic null) with ``inserted``
    inserted canaries when their cosines are exactly the estimator's model at ``epsilon``:
    N(μ, 1/d) with μ the Gaussian mechanism's separation at (ε, δ) against the null N(0, 1/d)
    (d cancels). Andrew et al. 2024 prove the inserted cosines tend to that for a Gaussian
    mechanism in high dimension; DP-FedAvg's final model is a Poisson-subsampled mixture whose
    ε is at most the accountant's, and its estimates were measured at or below this reference
    (``benchmarks/audit_calibration.py``). So an honest run's estimate lies below ``high`` in
    about 97.5 % of runs; the estimate's bias at this canary count is ``median - epsilon``."""
    mu = gaussian_separation(epsilon, delta)
    rng = np.random.default_rng(seed)
    estimates = [epsilon_two_gaussians((0.0, 1.0), _fit(rng.normal(mu, 1.0, inserted)), delta)
                 for _ in range(draws)]
    median, low, high = np.quantile(estimates, [0.5, 0.025, 0.975])
    return EstimateReference(float(epsilon), mu, float(median), float(low), float(high),
                             inserted, draws)


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v of r guesses correct] for an (ε, δ)-DP algorithm with m canaries (Steinke et al.
    2023, Theorem 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = special.expit(eps)
    tail = stats.binom.sf(v - 1, r, p)  # P[Bin >= v]
    if delta == 0 or v == 0:
        return float(min(tail, 1.0))
    shortfall = np.arange(1, v + 1)
    window = stats.binom.sf(v - shortfall - 1, r, p) - tail  # P[v - i <= Bin < v]
    return float(min(tail + 2 * m * delta * np.max(window / shortfall), 1.0))


def one_run_epsilon_bound(m: int, r: int, v: int, delta: float,
                          confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct of ``r`` guesses rule out at ``confidence`` (0 if
    none): an ε lower bound."""
    alpha = 1 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    return float(optimize.brentq(lambda e: one_run_p_value(m, r, v, e, delta) - alpha,
                                 low, high, xtol=1e-6))


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit of canary scores: the best bound over the tried guess counts."""

    epsilon_lower_bound: float
    guesses: int  # r of the best bound
    correct: int  # v of the best bound
    canaries: int
    included: int
    confidence: float
    design: str  # "independent coins" or "exactly half" (tested at a smaller error level)
    tried: list[dict]  # every guess count tried: r, v, bound (each at confidence')

    def to_dict(self) -> dict:
        return asdict(self)


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float,
                  confidence: float = 0.95,
                  guess_fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                  exactly_half: bool = False) -> OneRunAudit:
    """Guess "in" for the highest and "out" for the lowest scores, half each, for several
    numbers of guesses; each bound is taken at confidence 1 - (1 - confidence) / k for k
    guess counts (a union bound), so the best of them holds at ``confidence``.
    ``exactly_half``: the canaries were included as a uniformly random half, not by
    independent coins; every error level is multiplied by P[Bin(m, 1/2) = ⌊m/2⌋]."""
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(included, dtype=bool)
    m = len(scores)
    if exactly_half and int(truth.sum()) != m // 2:
        raise ValueError(f"exactly_half: {int(truth.sum())} of {m} canaries are included, "
                         f"not {m // 2}")
    order = np.argsort(-scores, kind="stable")
    counts = sorted({max(2, 2 * round(f * m / 2)) for f in guess_fractions if f * m >= 1})
    counts = [r for r in counts if r <= m]
    design_level = float(stats.binom.pmf(m // 2, m, 0.5)) if exactly_half else 1.0
    each = 1 - (1 - confidence) * design_level / len(counts)
    tried = []
    for r in counts:
        top, bottom = order[:r // 2], order[m - (r - r // 2):]
        correct = int(truth[top].sum() + (~truth[bottom]).sum())
        tried.append({"guesses": r, "correct": correct,
                      "bound": one_run_epsilon_bound(m, r, correct, delta, each)})
    best = max(tried, key=lambda t: t["bound"])
    return OneRunAudit(best["bound"], best["guesses"], best["correct"], m, int(truth.sum()),
                       confidence, "exactly half" if exactly_half else "independent coins",
                       tried)
