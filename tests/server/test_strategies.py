"""strategy.name: fedtune's path gives Flower's own aggregate; [strategy] and [faults] checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.serverapp import strategy as flower

from fedtune.config import ConfigError, ConfigWarning, load_config
from fedtune.privacy.mode import PrivacyPlan
from fedtune.server.strategies import build_strategy
from fedtune.tables.strategies import FLOWER, STRATEGIES, strategy_arguments
from tests.strategy_messages import configure, node_grid, numpy_of, reply

NUM_NODES = 5
BASE = ["data.num_clients=5", "strategy.fraction_train=1.0"]

# name -> (fedtune overrides, the same hyper-parameters as Flower's constructor arguments);
# values differ from the defaults so that a key that is not passed on would show.
CASES = {
    "fedavg": ([], {}),
    "fedprox": (["strategy.proximal_mu=0.3"], {"proximal_mu": 0.3}),
    "fedavgm": (["strategy.server_lr=0.7", "strategy.server_momentum=0.5"],
                {"server_learning_rate": 0.7, "server_momentum": 0.5}),
    "fedadam": (["strategy.fedopt_eta=0.05", "strategy.fedopt_beta_1=0.8",
                 "strategy.fedopt_beta_2=0.95", "strategy.fedopt_tau=0.01"],
                {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01}),
    "fedyogi": (["strategy.fedopt_eta=0.05", "strategy.fedopt_beta_1=0.8",
                 "strategy.fedopt_beta_2=0.95", "strategy.fedopt_tau=0.01"],
                {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01}),
    "fedadagrad": (["strategy.fedopt_eta=0.05", "strategy.fedopt_tau=0.01"],
                   {"eta": 0.05, "tau": 0.01}),
    "fedtrimmedavg": (["strategy.trim_beta=0.25"], {"beta": 0.25}),
    "fedmedian": ([], {}),
    "krum": (["strategy.num_malicious=1"], {"num_malicious_nodes": 1}),
    "multikrum": (["strategy.num_malicious=1", "strategy.multikrum_select=3"],
                  {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
}
CLASSES = {"fedavg": flower.FedAvg, "fedprox": flower.FedProx, "fedavgm": flower.FedAvgM,
           "fedadam": flower.FedAdam, "fedyogi": flower.FedYogi,
           "fedadagrad": flower.FedAdagrad, "fedtrimmedavg": flower.FedTrimmedAvg,
           "fedmedian": flower.FedMedian, "krum": flower.Krum, "multikrum": flower.MultiKrum}


def _global(rng):
    return {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32)}


def _two_rounds(strategy, seed=0):
    """Two rounds on the same hand-made replies; returns (train configs, aggregates, metrics)."""
    rng = np.random.default_rng(seed)
    grid = node_grid(NUM_NODES)
    arrays = _global(rng)
    configs, aggregates, metrics = [], [], []
    for server_round in (1, 2):
        messages = configure(strategy, grid, server_round, arrays)
        configs.append(dict(messages[0].content["config"]))
        replies = []
        for i, message in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id)):
            local = {k: v + rng.normal(scale=0.1 * (i + 1), size=v.shape).astype(np.float32)
                     for k, v in arrays.items()}
            replies.append(reply(message, local, {"num-examples": 10 + 7 * i,
                                                  "train-loss": 1.0 / (i + 1)}))
        new_arrays, new_metrics = strategy.aggregate_train(server_round, copy.deepcopy(replies))
        arrays = numpy_of(new_arrays)
        aggregates.append(arrays)
        metrics.append(dict(new_metrics))
    return configs, aggregates, metrics


def test_every_flower_strategy_is_exposed_and_tested():
    flowers = {name for name, entry in STRATEGIES.items()
               if entry.implementation.startswith(FLOWER)}
    assert set(CASES) == flowers == set(CLASSES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fedtune_path_gives_flowers_own_aggregate(name):
    overrides, kwargs = CASES[name]
    config = load_config(None, [*BASE, f"strategy.name={name}", *overrides])
    built = build_strategy(config, PrivacyPlan())
    assert type(built) is CLASSES[name]
    direct = CLASSES[name](min_available_nodes=NUM_NODES, **kwargs)
    ours, theirs = _two_rounds(built), _two_rounds(direct)
    assert ours[0] == theirs[0]  # same train config (e.g. FedProx's proximal-mu)
    for mine, flowers in zip(ours[1], theirs[1], strict=True):
        assert mine.keys() == flowers.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], flowers[key])
    assert ours[2] == theirs[2]
    if name not in ("fedavg", "fedprox"):  # the others really aggregate differently
        fedavg = _two_rounds(flower.FedAvg(min_available_nodes=NUM_NODES))
        assert not np.allclose(ours[1][1]["w"], fedavg[1][1]["w"])


def test_fedprox_sends_its_mu_to_the_clients():
    config = load_config(None, [*BASE, "strategy.name=fedprox", "strategy.proximal_mu=0.3"])
    configs, _, _ = _two_rounds(build_strategy(config, PrivacyPlan()))
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
