"""strategy.name: fedtune's path gives Flower's own aggregate; [strategy] and [faults] checks."""

from __future__ import annotations

import ast

import pytest

from fedtune.config import ConfigError, ConfigWarning, load_config
from fedtune.privacy.mode import PrivacyPlan
from fedtune.server.build_strategy import build_strategy
from fedtune.tables.strategies import STRATEGIES, strategy_arguments
from tests.conftest import REPO
from tests.strategy_messages import assert_flowers_own, two_rounds

BASE = ["data.num_clients=5", "strategy.fraction_train=1.0"]


def test_every_strategy_has_a_reference_test():
    """Each entry of the strategy table has at least one test named after it
    (``test_<name>_...``) that checks it against a reference: Flower's own class with the same
    hyper-parameters, or a NumPy reference of the paper's rule."""
    names = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    missing = [name for name in STRATEGIES
               if not any(test.startswith(f"test_{name}_") for test in names)]
    assert missing == []


def test_fedavg_is_flowers_fedavg():
    assert_flowers_own("fedavg", [], {}, differs_from_fedavg=False)


def test_fedprox_is_flowers_fedprox_with_its_mu():
    assert_flowers_own("fedprox", ["strategy.proximal_mu=0.3"], {"proximal_mu": 0.3},
                       differs_from_fedavg=False)  # FedProx's server is FedAvg's


def test_fedavgm_is_flowers_fedavgm_with_its_server_rate_and_momentum():
    assert_flowers_own("fedavgm", ["strategy.server_lr=0.7", "strategy.server_momentum=0.5"],
                       {"server_learning_rate": 0.7, "server_momentum": 0.5})


FEDOPT = (["strategy.fedopt_eta=0.05", "strategy.fedopt_beta_1=0.8", "strategy.fedopt_beta_2=0.95",
           "strategy.fedopt_tau=0.01"], {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01})


def test_fedadam_is_flowers_fedadam_with_its_rates():
    assert_flowers_own("fedadam", *FEDOPT)


def test_fedyogi_is_flowers_fedyogi_with_its_rates():
    assert_flowers_own("fedyogi", *FEDOPT)


def test_fedadagrad_is_flowers_fedadagrad_with_its_rate():
    assert_flowers_own("fedadagrad", ["strategy.fedopt_eta=0.05", "strategy.fedopt_tau=0.01"],
                       {"eta": 0.05, "tau": 0.01})


def test_fedtrimmedavg_is_flowers_fedtrimmedavg_with_its_beta():
    assert_flowers_own("fedtrimmedavg", ["strategy.trim_beta=0.25"], {"beta": 0.25})


def test_fedmedian_is_flowers_fedmedian():
    assert_flowers_own("fedmedian", [], {})


def test_krum_is_flowers_krum_with_its_malicious_count():
    assert_flowers_own("krum", ["strategy.num_malicious=1"], {"num_malicious_nodes": 1})


def test_multikrum_is_flowers_multikrum_with_its_selection():
    assert_flowers_own("multikrum", ["strategy.num_malicious=1", "strategy.multikrum_select=3"],
                       {"num_malicious_nodes": 1, "num_nodes_to_select": 3})


def test_fedprox_sends_its_mu_to_the_clients():
    config = load_config(None, [*BASE, "strategy.name=fedprox", "strategy.proximal_mu=0.3"])
    configs, _, _ = two_rounds(build_strategy(config, PrivacyPlan()))
    assert configs[0]["proximal-mu"] == 0.3


def test_keys_of_other_strategies_are_ignored_and_not_recorded(tmp_path):
    """A config file may set every strategy's keys (a sweep's base does): those of other
    strategies are a warning naming each, and never reach the strategy."""
    file = tmp_path / "c.toml"
    file.write_text('[strategy]\nname = "fedavgm"\nproximal_mu = 0.5\nfeddyn_alpha = 0.2\n'
                    'server_momentum = 0.7\n')
    with pytest.warns(ConfigWarning) as caught:
        config = load_config(file, BASE)
    assert sorted(str(w.message).split(" =")[0] for w in caught) == [
        "strategy.feddyn_alpha", "strategy.proximal_mu"]
    assert strategy_arguments(config) == {"server_learning_rate": 1.0,
                                                 "server_momentum": 0.7}


def test_multikrum_selects_clients_minus_malicious_by_default():
    config = load_config(None, [*BASE, "strategy.name=multikrum", "strategy.num_malicious=2"])
    assert strategy_arguments(config)["num_nodes_to_select"] == 3


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=fedsgd"], "strategy.name = 'fedsgd' is not allowed: must be one of "
                               "'fedavg', 'fedprox'"),
    (["strategy.name=scaffold"], "client.optimizer = 'adamw' is not allowed with strategy.name "
                                 "= 'scaffold': must be 'sgd'"),
    (["strategy.name=fednova", "client.optimizer=adam"], "client.optimizer = 'adam' is not "
                                                         "allowed with strategy.name = 'fednova'"),
    (["strategy.name=krum", "strategy.num_malicious=5"], "strategy.num_malicious = 5 is not "
                                                         "allowed: must be < the 5 clients"),
    (["strategy.name=multikrum", "strategy.multikrum_select=6"], "strategy.multikrum_select = 6 "
                                                                 "is not allowed: must be <= the "
                                                                 "5 clients"),
    (["strategy.trim_beta=0.5"], "strategy.trim_beta = 0.5 is not allowed: must be a number >= 0 "
                                 "and < 0.5"),
    (["strategy.server_momentum=1"], "strategy.server_momentum = 1 is not allowed"),
    (["strategy.feddyn_alpha=0"], "strategy.feddyn_alpha = 0 is not allowed: must be a number > 0"),
    (["faults.nan_fraction=0.05"], "faults.nan_fraction = 0.05 is not allowed with "
                                   "data.num_clients = 5: must pick at least one client"),
    (["faults.nan_fraction=1.5"], "faults.nan_fraction = 1.5 is not allowed: must be a number "
                                  ">= 0 and <= 1"),
    (["faults.crash_chance=0.1"], "faults.crash_chance is not a config key: [faults] "
                                  "allows nan_fraction, wrong_shape_fraction"),
])
def test_bad_strategy_and_fault_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*BASE, *overrides])
    assert message in str(error.value)
    assert "\n" not in str(error.value)
