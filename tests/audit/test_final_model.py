"""The final model's exact ε for one canary against dp-accounting's subsampled Gaussian and the
laws it is built from."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from fedtune.audit.final_model import (
    final_model_epsilon,
    momentum_weights,
    participation_distribution,
)


def _every_round_pld(noise: float, rate: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(noise)), rounds)
    return dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)


def test_one_round_is_the_poisson_subsampled_gaussian():
    assert final_model_epsilon(2.0, 0.3, np.ones(1), 1e-5) == pytest.approx(
        _every_round_pld(2.0, 0.3, 1, 1e-5), rel=1e-3)


def test_the_final_model_leaks_at_most_what_every_round_does():
    """A post-processing of all rounds' releases; at q = 0.2 and 40 rounds the sum is nearly
    sufficient, so the final model gives away almost as much (the study's regime)."""
    every_round = _every_round_pld(5.0, 0.2, 40, 1e-5)
    final = final_model_epsilon(5.0, 0.2, np.ones(40), 1e-5)
    assert 0.95 * every_round < final <= every_round
    # server momentum 0.9 spreads the last rounds' weights: less again
    assert final_model_epsilon(5.0, 0.2, momentum_weights(40, 1.0, 0.9), 1e-5) < final


def test_momentum_weights_and_the_participation_law():
    assert momentum_weights(3, 1.0, 0.9) == pytest.approx([2.71, 1.9, 1.0])
    assert momentum_weights(3, 0.5, 0.0) == pytest.approx([0.5, 0.5, 0.5])
    weights = momentum_weights(50, 1.0, 0.9)
    support, probabilities = participation_distribution(weights, 0.2)
    assert probabilities.sum() == pytest.approx(1.0)
    assert support @ probabilities == pytest.approx(0.2 * weights.sum())  # the mean is exact
    variance = (support ** 2) @ probabilities - (support @ probabilities) ** 2
    exact, step = 0.2 * 0.8 * np.sum(weights ** 2), weights.max() / 4
    assert exact <= variance <= exact + 50 * 0.2 * step ** 2 / 4  # splitting adds at most this
    # equal weights: the binomial law itself
    support, probabilities = participation_distribution(np.ones(10), 0.3, cells=1)
    from scipy import stats

    assert probabilities == pytest.approx(stats.binom.pmf(support, 10, 0.3), rel=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        participation_distribution(np.array([1.0, -1.0]), 0.3)
