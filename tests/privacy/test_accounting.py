"""Accountants: fedtune's ε against opacus.accountants and Google's dp-accounting."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.privacy.accounting import (
    compose,
    epsilon,
    history_from_lists,
    history_to_lists,
    noise_for_target,
    steps_within_budget,
)

# (sample rate q, noise multiplier σ, steps, δ): DP-SGD-like and DP-FedAvg-like settings
GRID = [(0.01, 1.1, 1000, 1e-5), (0.05, 0.8, 120, 1e-5), (0.25, 1.0, 20, 1e-3),
        (0.06, 2.5, 40, 1e-5), (1.0, 5.0, 10, 1e-5), (0.5, 1.5, 3, 1e-2)]


def _opacus_by_steps(mechanism: str, q: float, sigma: float, steps: int, delta: float) -> float:
    """What an Opacus PrivacyEngine's accountant reports after ``steps`` optimizer steps."""
    accountant = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def _google(mechanism: str, q: float, sigma: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    accountant = (dp_accounting.rdp.RdpAccountant() if mechanism == "rdp"
                  else dp_accounting.pld.PLDAccountant())
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_independent_accountants_over_a_grid(mechanism):
    for q, sigma, steps, delta in GRID:
        # fedtune builds its history round by round (here: 3 uneven rounds)
        first, second = steps // 3, steps // 2
        history = compose(compose(compose([], sigma, q, first), sigma, q, second),
                          sigma, q, steps - first - second)
        ours = epsilon(history, delta, mechanism)
        by_steps = _opacus_by_steps(mechanism, q, sigma, steps, delta)
        if mechanism == "rdp":  # composed from the cached one-step RDP: the same bits
            assert ours == by_steps, (q, sigma, steps, delta)
        assert ours == pytest.approx(by_steps, rel=0.01), (q, sigma, steps, delta)
        # Google's RDP / PLD accountants: another implementation of the same bounds (PRV is
        # an upper bound within eps_error = 0.01, absolute)
        assert ours == pytest.approx(_google(mechanism, q, sigma, steps, delta), rel=0.01,
                                     abs=0.011 if mechanism == "prv" else 0)


def test_rdp_composed_from_cached_steps_is_opacus_to_the_bit():
    """ε of a history is composed from one-step RDP cached per (σ, q) (the server accounts
    hundreds of clients that share a few): exactly Opacus' RDPAccountant on the same history,
    for histories of one to three entries mixing σ, q and step counts; dp-accounting's RDP
    accountant, composing the same events, agrees to 0.5 % (it keeps the orders where Opacus'
    series for q = 0.5, σ = 0.8 gives up: 0.2 % apart)."""
    settings = [(0.8, 0.5), (1.1, 1 / 3), (2.5, 0.01), (7.3, 0.2)]
    for count in (1, 2, 3):
        for entries in itertools.combinations(settings, count):
            history = [(sigma, q, 7 + 40 * i) for i, (sigma, q) in enumerate(entries)]
            accountant = RDPAccountant()
            accountant.history = list(history)
            ours = epsilon(history, 1e-5, "rdp")
            assert ours == accountant.get_epsilon(delta=1e-5), history
            if count == 3:
                events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                    q, dp_accounting.GaussianDpEvent(sigma)), steps)
                    for sigma, q, steps in history]
                google = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
                google.compose(dp_accounting.ComposedDpEvent(events))
                assert ours == pytest.approx(google.get_epsilon(1e-5), rel=0.005), history


def test_no_steps_is_zero_and_no_noise_is_infinite():
    assert epsilon([], 1e-5, "rdp") == 0.0
    assert epsilon([(0.0, 0.1, 5)], 1e-5, "rdp") == math.inf
    assert epsilon([(1.0, 0.1, 5), (0.0, 0.1, 1)], 1e-5, "prv") == math.inf


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_for_target_spends_the_target_and_no_more(mechanism):
    for target, q, steps in [(1.0, 0.05, 50), (8.0, 0.25, 10)]:
        sigma = noise_for_target(target, 1e-5, q, steps, mechanism)
        spent = epsilon([(sigma, q, steps)], 1e-5, mechanism)
        assert spent <= target
        assert spent >= target - 0.05  # not wastefully noisy either
    assert noise_for_target(math.inf, 1e-5, 0.1, 10, "rdp") == 0.0


def test_steps_within_budget_is_the_last_step_below_the_target():
    history = [(1.0, 0.1, 30)]
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(4.85, abs=0.01)
    for target in (5.0, 6.0, 8.0):
        allowed = steps_within_budget(history, 1.0, 0.1, 100, target, 1e-5, "rdp")
        assert epsilon(compose(history, 1.0, 0.1, allowed), 1e-5, "rdp") <= target
        assert epsilon(compose(history, 1.0, 0.1, allowed + 1), 1e-5, "rdp") > target
    assert steps_within_budget(history, 1.0, 0.1, 5, 100.0, 1e-5, "rdp") == 5
    assert steps_within_budget(history, 1.0, 0.1, 5, 4.0, 1e-5, "rdp") == 0


def test_history_merges_equal_steps_and_round_trips_through_lists():
    history = compose(compose([], 1.0, 0.1, 4), 1.0, 0.1, 4)
    assert history == [(1.0, 0.1, 8)]
    history = compose(history, 2.0, 0.1, 3)
    assert history == [(1.0, 0.1, 8), (2.0, 0.1, 3)]
    assert history_from_lists(history_to_lists(history)) == history
    assert list(itertools.chain(*history_to_lists(history).values())) == [1.0, 2.0, 0.1, 0.1,
                                                                          8, 3]
