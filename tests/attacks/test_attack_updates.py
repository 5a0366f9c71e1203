"""The attacks' arithmetic against hand-computed references, and who attacks."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.attacks.alie import alie_update, z_max
from fedtune.attacks.gaussian import gaussian_update
from fedtune.attacks.ipm import ipm_update
from fedtune.attacks.lora import adapter_scaled
from fedtune.attacks.min_max import (
    largest_gamma,
    largest_pairwise,
    min_max_update,
    min_sum_update,
)
from fedtune.attacks.plan import AttackPlan, UpdateContext
from fedtune.attacks.scaling import scaled, sign_flipped
from fedtune.config import ConfigError, load_config
from tests.conftest import MLP_DIGITS


def _context(benign=(), **settings) -> UpdateContext:
    return UpdateContext(settings, np.random.default_rng(0), 10, 2.0,
                         [{"w": np.array(b, dtype=np.float64)} for b in benign])


def test_scaling_and_sign_flipping():
    honest = {"w": np.array([0.5, -1.0])}
    np.testing.assert_allclose(scaled(_context(scale_factor=-10.0), honest)["w"], [-5.0, 10.0])
    np.testing.assert_allclose(sign_flipped(_context(), honest)["w"], [-0.5, 1.0])


def test_lora_scaling_touches_only_the_adapter_matrices():
    honest = {"enc.query.lora_A.default.weight": np.array([1.0, -2.0]),
              "enc.value.lora_B.default.weight": np.array([0.5]),
              "classifier.weight": np.array([3.0, 4.0])}
    sent = adapter_scaled(_context(lora_scale=-10.0), honest)
    np.testing.assert_allclose(sent["enc.query.lora_A.default.weight"], [-10.0, 20.0])
    np.testing.assert_allclose(sent["enc.value.lora_B.default.weight"], [-5.0])
    np.testing.assert_allclose(sent["classifier.weight"], [3.0, 4.0])


def test_gaussian_noise_has_the_configured_spread_and_ignores_the_update():
    sent = gaussian_update(_context(noise_std=2.0), {"w": np.zeros(20000)})["w"]
    assert abs(sent.std() - 2.0) < 0.05 and abs(sent.mean()) < 0.05


def test_alie_sends_mean_minus_z_std_and_z_max_is_the_papers():
    # n = 10 per round, m = 2 attackers: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10)
    assert z_max(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    # n = 50, m = 12 (Baruch et al. 2019, their setting for CIFAR): s = 14, Phi^-1(36/50)
    assert z_max(50, 12) == pytest.approx(0.5828415, abs=1e-6)
    sent = alie_update(_context([[1.0, 2.0], [3.0, 2.0]], alie_z=1.0), {"w": np.zeros(2)})
    np.testing.assert_allclose(sent["w"], [1.0, 2.0])  # mean [2, 2], std [1, 0]


def test_ipm_sends_minus_epsilon_times_the_mean():
    sent = ipm_update(_context([[1.0, 2.0], [3.0, 0.0]], ipm_epsilon=0.5), {"w": np.zeros(2)})
    np.testing.assert_allclose(sent["w"], [-1.0, -0.5])


def test_min_max_and_min_sum_find_the_largest_gamma():
    """Honest updates 0, 1, 5 (1-D): mean 2, p = -std = -sqrt(14/3).
    min-max: the farthest honest update (5) at 3 + |p| gamma <= 5 (the largest pairwise
    distance): gamma = 2 / |p|. min-sum: u^2 + (u-1)^2 + (u-5)^2 <= 41 (the largest honest
    sum, of 5) holds for u >= -1: gamma = 3 / |p|; both send 2 - |p| gamma."""
    context = _context([[0.0], [1.0], [5.0]])
    assert min_max_update(context, {"w": np.zeros(1)})["w"][0] == pytest.approx(0.0, abs=1e-4)
    assert min_sum_update(context, {"w": np.zeros(1)})["w"][0] == pytest.approx(-1.0, abs=1e-4)


@pytest.mark.parametrize("rule", ["max", "sum"])
def test_min_max_and_min_sum_match_the_direct_search_on_many_coordinates(rule):
    """The search's distances as a quadratic in gamma give the gamma (and update) of measuring
    every candidate against every benign update coordinate by coordinate."""
    benign = np.random.default_rng(3).normal(size=(12, 500)) * np.linspace(0.1, 2, 500)
    mean, direction = benign.mean(axis=0), -benign.std(axis=0)
    pairwise = ((benign[:, None] - benign[None]) ** 2).sum(axis=2)
    bound = pairwise.max() if rule == "max" else pairwise.sum(axis=1).max()

    def fits(gamma):
        distances = ((mean + gamma * direction - benign) ** 2).sum(axis=1)
        return (distances.max() if rule == "max" else distances.sum()) <= bound

    expected = mean + largest_gamma(fits) * direction
    update = (min_max_update if rule == "max" else min_sum_update)(
        _context(benign.tolist()), {"w": np.zeros(500)})
    np.testing.assert_allclose(update["w"], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rows", [
    np.random.default_rng(4).normal(size=(30, 3000)) * np.linspace(0.5, 1.5, 30)[:, None],
    np.eye(20, 300) * 3.0,  # every pair at the same distance: every row is near the largest
])
def test_the_largest_pairwise_distance_is_float64s_though_its_pairs_are_found_in_float32(rows):
    """The float32 Gram matrix only picks the pairs: the value equals the direct float64 one
    far below float32's rounding (1e-7)."""
    offsets = rows - rows.mean(axis=0)
    direct = ((offsets[:, None] - offsets[None]) ** 2).sum(axis=2).max()
    norms = (offsets ** 2).sum(axis=1)
    assert largest_pairwise(offsets, norms) == pytest.approx(direct, rel=1e-13)


def _plan(*overrides: str) -> AttackPlan:
    return AttackPlan.from_config(load_config(None, [*MLP_DIGITS, "data.num_clients=10",
                                                     *overrides]))


def test_attackers_are_drawn_from_the_seed_or_named_and_grouped():
    drawn = _plan("attack.name=alie", "attack.fraction=0.3", "attack.collude=2")
    assert len(drawn.attackers) == 3 and drawn.attackers == tuple(sorted(drawn.attackers))
    assert drawn.groups == (drawn.attackers[:2], drawn.attackers[2:])
    assert _plan("attack.name=alie", "attack.count=3").attackers == drawn.attackers
    assert _plan("attack.name=alie", "attack.count=3", "run.seed=1").attackers != drawn.attackers
    named = _plan("attack.name=ipm", "attack.clients=[7, 2]", "attack.start_round=3")
    assert named.attackers == (2, 7) and named.groups == ((2, 7),)
    assert not named.attacks(2, 2) and named.attacks(2, 3) and not named.attacks(3, 3)
    assert named.describe()["attackers"] == [2, 7]
    assert _plan().describe() == {"name": "none"}


@pytest.mark.parametrize("overrides, message", [
    (["attack.name=alie"], "attack.name = 'alie' needs exactly one of attack.fraction, "
                           "attack.count or attack.clients, got none of them"),
    (["attack.name=alie", "attack.count=2", "attack.fraction=0.1"], "got fraction, count"),
    (["attack.name=alie", "attack.clients=[1, 10]"], "attack.clients = [1, 10] is not allowed: "
                                                     "must be distinct client ids in 0..9"),
    (["attack.name=ipm", "attack.count=11"], "attack.count = 11 is not allowed: must be <= "
                                             "data.num_clients = 10"),
    (["attack.name=sign_flip", "attack.fraction=0.01"], "must pick at least one client"),
    (["attack.name=ipm", "attack.count=1", "attack.scale_factor=2"],
     "attack.scale_factor = 2.0 is not allowed with attack.name = 'ipm'"),
    (["attack.name=mirror"], "attack.name = 'mirror' is not allowed"),
    (["attack.name=lora_scaling", "attack.count=1"],
     "attack.name = 'lora_scaling' is not allowed with model.transfer = 'full': must be 'lora'"),
])
def test_bad_attack_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*MLP_DIGITS, "data.num_clients=10", *overrides])
    assert message in str(error.value) and "\n" not in str(error.value)
