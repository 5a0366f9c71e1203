"""strategy.secure_aggregation: which strategies and settings SecAgg+ accepts, one line each."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError, load_config
from fedtune.tables.strategies import STRATEGIES

SECURE = "strategy.secure_aggregation=true"


def test_every_strategy_is_a_weighted_sum_or_says_why_it_needs_the_updates():
    for name, entry in STRATEGIES.items():
        assert bool(entry.sum_weight) != bool(entry.needs_updates), name


def _settings(name: str) -> list[str]:
    """A config of strategy ``name`` that passes its own checks with 8 clients, all sampled."""
    optimizer = "client.optimizer=sgd" if STRATEGIES[name].sgd_only else "client.lr=1e-4"
    return [f"strategy.name={name}", optimizer, "data.num_clients=8",
            "strategy.fraction_train=1.0",
            *(f"{key}={value}" for key, value in STRATEGIES[name].requires.items())]


@pytest.mark.parametrize("name", [n for n, e in STRATEGIES.items() if e.sum_weight])
def test_weighted_sum_strategies_take_secure_aggregation(name):
    config = load_config(None, [SECURE, *_settings(name)])
    assert config.strategy.secure_aggregation


@pytest.mark.parametrize("name", [n for n, e in STRATEGIES.items() if e.needs_updates])
def test_strategies_that_need_every_update_refuse_secure_aggregation_saying_why(name):
    with pytest.raises(ConfigError) as error:
        load_config(None, [SECURE, *_settings(name)])
    assert str(error.value).startswith(
        f"strategy.secure_aggregation = true is not allowed with strategy.name = {name!r}: "
        f"{STRATEGIES[name].needs_updates}, and SecAgg+ shows the server only the sum")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["strategy.name=fedmedian"], "strategy.secure_aggregation = true is not allowed with "
                                  "strategy.name = 'fedmedian': it takes the median of every "
                                  "coordinate over the individual updates"),
    (["strategy.name=krum"], "'krum': it scores every individual update"),
    (["strategy.name=fedtrimmedavg"], "'fedtrimmedavg': it sorts every coordinate"),
    (["strategy.name=rfa"], "'rfa': its geometric median reweights every individual update"),
    (["strategy.fraction_train=0.25", "data.num_clients=8"],
     "strategy.fraction_train = 0.25 is not allowed with strategy.secure_aggregation = true: "
     "2 clients per round, at least 3 needed"),
    (["strategy.secagg_degree=5"], "strategy.secagg_degree = 5 is not allowed: must be even"),
    (["strategy.secagg_threshold=0.5"], "strategy.secagg_threshold = 0.5 is not allowed: must "
                                        "be a number > 0.5 and <= 1"),
    (["strategy.secagg_bits=31"], "strategy.secagg_bits = 31 is not allowed"),
    (["strategy.update_norm_z=3"], "strategy.update_norm_z = 3 is not allowed with "
                                   "strategy.secure_aggregation = true: must be 0"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.adaptive_clipping=true",
      "strategy.fraction_train=0.5"],
     "privacy.adaptive_clipping = true is not allowed with strategy.secure_aggregation = true"),
])
def test_secure_aggregation_errors_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [SECURE, "strategy.fraction_train=0.5", *overrides])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_crash_at_a_protocol_stage_needs_secure_aggregation():
    with pytest.raises(ConfigError, match="faults.crash_stage = 'unmask' is not allowed with "
                                          "strategy.secure_aggregation = false"):
        load_config(None, ["faults.crash_stage=unmask"])
    assert load_config(None, [SECURE, "strategy.fraction_train=0.5",
                              "faults.crash_stage=unmask"]).faults.crash_stage == "unmask"
