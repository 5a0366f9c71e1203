"""The audit's statistics against closed forms, numerical integration and simulated mechanisms
of known ε."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from fedtune.audit.estimators import (
    canary_epsilon,
    canary_estimate_reference,
    epsilon_two_gaussians,
    gaussian_separation,
    log_delta_one_way,
    one_run_audit,
    one_run_epsilon_bound,
    one_run_p_value,
)


def _gaussian_mechanism_delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity / noise = mu (Balle & Wang 2018)."""
    return (stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_equal_variances_give_the_gaussian_mechanisms_epsilon(mu, delta):
    eps = epsilon_two_gaussians((0.0, 1.0), (mu, 1.0), delta)
    assert eps > 0
    assert _gaussian_mechanism_delta(eps, mu) == pytest.approx(delta, rel=1e-4)
    # scale and shift do not matter, only the separation in standard deviations
    assert epsilon_two_gaussians((3.0, 0.2), (3.0 + 0.2 * mu, 0.2), delta) == pytest.approx(eps)


@pytest.mark.parametrize("p, q, eps", [
    ((0.0, 1.0), (1.0, 1.6), 1.0),  # wider alternative: the loss grows in both tails
    ((0.0, 1.0), (0.5, 0.6), 0.5),  # narrower alternative: the loss is high in between
    ((0.2, 0.8), (-0.4, 1.1), 2.0),
])
def test_privacy_profile_of_unequal_gaussians_matches_numerical_integration(p, q, eps):
    """δ(ε) = ∫ max(0, q(x) - e^ε p(x)) dx, integrated numerically."""
    def excess(x):
        return max(0.0, stats.norm.pdf(x, *q) - math.exp(eps) * stats.norm.pdf(x, *p))

    expected, _ = integrate.quad(excess, -30, 30, limit=400, points=[-3, 0, 3])
    assert math.exp(log_delta_one_way(eps, p, q)) == pytest.approx(expected, rel=1e-5,
                                                                    abs=1e-12)


def _canary_release(sigma: float, seed: int, dimension: int = 20_000, canaries: int = 500):
    """One Gaussian-mechanism release of the sum of the inserted canaries' unit directions
    (clip C = 1, noise sigma): each canary's inclusion is then a Gaussian mechanism of
    sensitivity 1 and noise sigma, whose ε is known exactly."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((canaries, dimension))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    inserted = np.zeros(canaries, dtype=bool)
    inserted[rng.permutation(canaries)[:canaries // 2]] = True
    release = directions[inserted].sum(axis=0) + rng.normal(0.0, sigma, dimension)
    cosines = directions @ release / np.linalg.norm(release)
    return cosines[inserted], cosines[~inserted]


@pytest.mark.parametrize("sigma, seed", [(0.8, 0), (1.5, 1), (3.0, 2)])
def test_canary_estimator_recovers_a_known_epsilon_within_its_interval(sigma, seed):
    true_epsilon = epsilon_two_gaussians((0.0, 1.0), (1.0 / sigma, 1.0), 1e-5)
    inserted, held_out = _canary_release(sigma, seed)
    estimate = canary_epsilon(inserted, held_out, 1e-5, dimension=20_000, seed=seed)
    assert estimate.ci_low <= true_epsilon <= estimate.ci_high
    # the point estimate leans high: a fitted std a few % above 1/sqrt(d) fattens the tail
    assert true_epsilon / 1.5 < estimate.epsilon < 2.2 * true_epsilon
    assert estimate.null == "analytic N(0, 1/d)"
    assert true_epsilon / 1.5 < estimate.epsilon_held_out_null < 2.2 * true_epsilon
    assert estimate.held_out_std == pytest.approx(20_000 ** -0.5, rel=0.15)  # the null


@pytest.mark.parametrize("seed", range(3))
def test_canary_estimator_finds_little_without_a_signal(seed):
    """Inserted canaries that left no trace: the interval reaches down to about 0 (no false
    violation), and with 250 inserted canaries the estimate itself is small."""
    rng = np.random.default_rng(seed)
    dimension = 10_000
    inserted, held_out = (rng.normal(0, dimension ** -0.5, 250) for _ in range(2))
    estimate = canary_epsilon(inserted, held_out, 1e-5, dimension=dimension, seed=seed)
    assert estimate.ci_low < 0.5 and estimate.epsilon < 2.0


def test_one_run_bound_for_perfect_guesses_is_the_theorems_closed_form():
    """With δ = 0 and every guess right, Bin(r, p)'s tail P[all r right] = p^r must reach
    1 - confidence: p = 0.05^(1/r), ε = log(p / (1 - p)). For r = 100 that is ε >= 3.493 at 95%
    confidence, whatever the number of canaries m >= r."""
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        expected = math.log(p / (1 - p))
        assert one_run_epsilon_bound(m=1000, r=r, v=r, delta=0.0) == pytest.approx(expected,
                                                                                   rel=1e-5)
    assert one_run_epsilon_bound(1000, 100, 100, 0.0) == pytest.approx(3.493, abs=1e-3)
    # δ > 0 can only weaken the bound; more canaries (more chances for δ) weaken it further
    with_delta = one_run_epsilon_bound(1000, 100, 100, 1e-5)
    assert with_delta < one_run_epsilon_bound(1000, 100, 100, 0.0)
    assert one_run_epsilon_bound(10**6, 100, 100, 1e-5) < with_delta
    # half right is what guessing gives: no evidence
    assert one_run_epsilon_bound(1000, 100, 50, 1e-5) == 0.0


def test_one_run_p_value_adds_the_delta_term_of_the_theorem():
    m, r, v, eps, delta = 500, 60, 50, 1.0, 1e-4
    p = special.expit(eps)
    tail = stats.binom.sf(v - 1, r, p)
    windows = [(stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i
               for i in range(1, v + 1)]
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        tail + 2 * m * delta * max(windows), rel=1e-9)
    assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-12)


def test_one_run_audit_of_randomized_response_is_a_valid_lower_bound():
    """An ε-DP mechanism (randomized response at ε = 1, scores = its noisy membership bits):
    the bound stays below 1 in all but a few of many trials, and comes close to it."""
    eps, m = 1.0, 2000
    bounds = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < special.expit(eps)
        reported = np.where(truthful, included, ~included)
        scores = reported + 1e-3 * rng.random(m)  # ties broken at random
        bounds.append(one_run_audit(scores, included, delta=1e-5).epsilon_lower_bound)
    assert np.mean(np.array(bounds) > eps) <= 0.1  # 95% confidence: rare violations only
    assert np.median(bounds) > 0.6  # and the audit has power


def test_one_run_audit_of_a_perfect_attack_reaches_the_cap_of_m():
    included = np.arange(200) % 2 == 0
    audit = one_run_audit(included.astype(float), included, delta=0.0)
    assert audit.correct == audit.guesses == 200
    # six guess counts share the 5%: each bound is taken at 1 - 0.05 / 6
    p = (0.05 / 6) ** (1 / 200)
    assert audit.epsilon_lower_bound == pytest.approx(math.log(p / (1 - p)), rel=1e-5)


def test_one_run_audit_of_an_exact_half_is_valid_and_pays_for_the_design():
    """Randomized response at ε = 1 on canaries included as an exact random half (the canary
    clients' design): the bound, taken at the error level times P[Bin(m, 1/2) = m/2], stays
    below ε in (nearly) every trial, and is never above the independent-coins bound."""
    eps, m = 1.0, 2000
    bounds = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = np.zeros(m, dtype=bool)
        included[rng.permutation(m)[:m // 2]] = True
        reported = np.where(rng.random(m) < special.expit(eps), included, ~included)
        scores = reported + 1e-3 * rng.random(m)
        half = one_run_audit(scores, included, delta=1e-5, exactly_half=True)
        coins = one_run_audit(scores, included, delta=1e-5)
        assert half.epsilon_lower_bound <= coins.epsilon_lower_bound
        assert half.design == "exactly half" and coins.design == "independent coins"
        bounds.append(half.epsilon_lower_bound)
    assert np.mean(np.array(bounds) > eps) <= 0.05 and np.median(bounds) > 0.4
    # a perfect attack: each of six guess counts at 0.05 / 6 * P[Bin(200, 1/2) = 100]
    included = np.arange(200) % 2 == 0
    perfect = one_run_audit(included.astype(float), included, delta=0.0, exactly_half=True)
    p = (0.05 / 6 * stats.binom.pmf(100, 200, 0.5)) ** (1 / 200)
    assert perfect.epsilon_lower_bound == pytest.approx(math.log(p / (1 - p)), rel=1e-5)
    with pytest.raises(ValueError, match="99 of 200 canaries are included, not 100"):
        one_run_audit(np.zeros(200), np.arange(200) < 99, 1e-5, exactly_half=True)


@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
def test_gaussian_separation_is_the_gaussian_mechanisms(eps):
    mu = gaussian_separation(eps, 1e-5)
    assert _gaussian_mechanism_delta(eps, mu) == pytest.approx(1e-5, rel=1e-4)
    assert gaussian_separation(0.0, 1e-5) == 0.0


def test_estimate_reference_is_centred_with_many_canaries_and_reads_high_with_few():
    """With 20,000 inserted canaries the one-shot estimate of a mechanism at ε = 1 is close to
    1 (1.06: the bias shrinks slowly); with the study's 500 it reads high (the fitted variance's
    noise fattens the tail): its median and 97.5 % quantile are what audit.json shows beside a
    run's estimate."""
    many = canary_estimate_reference(1.0, 1e-5, 20_000, draws=100)
    assert many.median == pytest.approx(1.0, abs=0.1) and many.high < 1.3
    few = canary_estimate_reference(1.0, 1e-5, 500)
    assert 1.2 < few.median < 1.6 and 2.0 < few.high < 2.8 and few.low < 1.0
    assert few.separation == pytest.approx(gaussian_separation(1.0, 1e-5))
    assert few.inserted == 500 and few.draws == 400
