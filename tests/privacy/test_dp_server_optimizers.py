"""DP-FedAvg as practitioners run it: server optimizers on the noised mean (DP-FedAvgM,
DP-FedAdam), adaptive clipping that converges, canary clients, and the config that picks them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedtune.config import ConfigError, load_config
from fedtune.privacy.central_dp import CentralDP, server_optimizer
from strategies import dp_fedavg
from strategies.dp_fedavg import DPFedAvg, canary_direction, canary_inserted
from tests.conftest import MLP_DIGITS

SHAPES = {"w": (5, 3), "b": (3,), "steps": (1,)}  # an integer buffer rides along


@pytest.fixture(autouse=True)
def server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class Nodes:
    """The part of a Grid the strategies' configure_train reads."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def _initial(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items() if k != "steps"}
    return {**arrays, "steps": np.array([7], dtype=np.int64)}


def _reply(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _play(strategy, rounds: int, clients: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``rounds`` rounds in which every client moves the model by its own random step."""
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({k: Array(v) for k, v in _initial(rng).items()})
    history = []
    for server_round in range(1, rounds + 1):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), Nodes(clients)))
        current = {k: v.numpy() for k, v in arrays.items()}
        replies = [_reply({k: (v + rng.normal(scale=0.3, size=v.shape).astype(v.dtype)
                               if k != "steps" else v) for k, v in current.items()})
                   for _ in range(clients)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        history.append({k: v.numpy().copy() for k, v in arrays.items()})
    return history


def _no_privacy(**optimizer) -> DPFedAvg:
    """σ = 0, C = ∞, q = 1: DP-FedAvg's mean is FedAvg's (equal weights, every client)."""
    return DPFedAvg(sample_rate=1.0, noise_multiplier=0.0, clipping_norm=math.inf,
                    min_available_nodes=1, **optimizer)


def _assert_same(ours, theirs):
    """Equal floating arrays (Flower also averages the integer buffer; DP-FedAvg keeps the
    server's, and fedtune's round casts Flower's float64 results back to the model's dtypes)."""
    for mine, flower in zip(ours, theirs, strict=True):
        assert mine.keys() == flower.keys()
        for name in ("w", "b"):
            assert mine[name].dtype == np.float32
            np.testing.assert_allclose(mine[name], flower[name].astype(np.float32),
                                       rtol=1e-5, atol=1e-6)
        assert mine["steps"][0] == 7


def test_dp_fedavgm_without_noise_or_clipping_at_rate_1_and_no_momentum_is_fedavg():
    flower = _play(FedAvg(min_available_nodes=1), rounds=3, clients=4, seed=0)
    ours = _play(_no_privacy(server_learning_rate=1.0, server_momentum=0.0), rounds=3,
                 clients=4, seed=0)
    _assert_same(ours, flower)


def test_dp_fedavgm_without_noise_or_clipping_is_flowers_fedavgm():
    flower = _play(FedAvgM(min_available_nodes=1, server_learning_rate=0.7,
                           server_momentum=0.9), rounds=4, clients=3, seed=1)
    ours = _play(_no_privacy(server_learning_rate=0.7, server_momentum=0.9), rounds=4,
                 clients=3, seed=1)
    _assert_same(ours, flower)
    plain = _play(_no_privacy(), rounds=4, clients=3, seed=1)
    assert not np.allclose(ours[-1]["w"], plain[-1]["w"])  # momentum really acted


def test_dp_fedadam_without_noise_or_clipping_is_flowers_fedadam():
    arguments = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    flower = _play(FedAdam(min_available_nodes=1, **arguments), rounds=4, clients=3, seed=2)
    ours = _play(_no_privacy(server_optimizer="adam", server_learning_rate=0.05,
                             adam_betas=(0.9, 0.99), adam_tau=1e-3), rounds=4, clients=3,
                 seed=2)
    _assert_same(ours, flower)


def test_the_server_optimizer_steps_on_the_noised_mean():
    """With noise, momentum carries last round's noised mean: w2 - w1 = lr (β m1 + m2)."""
    strategy = DPFedAvg(sample_rate=1.0, noise_multiplier=1.0, clipping_norm=0.5,
                        server_learning_rate=2.0, server_momentum=0.5, min_available_nodes=1)
    rng = np.random.default_rng(3)
    zero = ArrayRecord({"w": Array(np.zeros((5, 3), np.float32)),
                        "b": Array(np.zeros(3, np.float32))})
    means = []
    arrays = zero
    for server_round in (1, 2):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), Nodes(4)))
        before = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        replies = [_reply({k: v + rng.normal(scale=0.3, size=v.shape).astype(np.float32)
                           for k, v in before.items()}) for _ in range(4)]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        step = {k: arrays[k].numpy() - before[k] for k in before}
        means.append(step if server_round == 1 else
                     {k: step[k] / 2.0 - 0.5 * means[0][k] / 2.0 for k in step})
        assert metrics[dp_fedavg.NOISE_STD] == pytest.approx(1.0 * 0.5 / 4)
    # momentum: the second step is lr (β m1 + m2); m2 is the second noised mean, whose
    # noise (std σC/qN = 0.125) dominates the clipped updates: it is not the first mean
    assert np.abs(means[1]["w"]).mean() > 0.01
    np.testing.assert_allclose(strategy.first_moment[0], 0.5 * means[0]["w"] / 2.0
                               + means[1]["w"], rtol=1e-4, atol=1e-5)


def _synthetic_norms(rng: np.random.Generator, clients: int) -> list[Message]:
    """Updates of log-normal norms (median 3) in random directions around a zero model."""
    replies = []
    for _ in range(clients):
        direction = rng.normal(size=(5, 3))
        norm = math.exp(rng.normal(math.log(3.0), 0.5))
        replies.append(_reply({"w": (norm * direction / np.linalg.norm(direction))
                               .astype(np.float32), "b": np.zeros(3, np.float32),
                               "steps": np.array([7])}))
    return replies


def test_adaptive_clipping_converges_to_the_target_quantile_of_synthetic_norms():
    """Andrew et al. 2021's defaults (γ = 0.5, η = 0.2, start at 0.1, σ_b = cohort / 20) find
    the median of log-normal update norms (3.0) from 30x too small within 150 rounds, with
    noise on the unclipped count."""
    rng = np.random.default_rng(4)
    strategy = DPFedAvg(sample_rate=1.0, noise_multiplier=1.0, clipping_norm=0.1,
                        adaptive=True, target_quantile=0.5, clip_learning_rate=0.2,
                        min_available_nodes=1, seed=4)
    zero = ArrayRecord({"w": Array(np.zeros((5, 3), np.float32)),
                        "b": Array(np.zeros(3, np.float32)), "steps": Array(np.array([7]))})
    bounds, unclipped = [], []
    for server_round in range(1, 151):
        list(strategy.configure_train(server_round, zero, ConfigRecord(), Nodes(100)))
        _, metrics = strategy.aggregate_train(server_round, _synthetic_norms(rng, 100))
        bounds.append(metrics[dp_fedavg.CLIP_NORM])
        unclipped.append(metrics[dp_fedavg.UNCLIPPED] / 100)
    assert bounds[0] == 0.1 and bounds[30] > 1.5  # geometric growth: ~e^0.1 a round
    assert np.median(bounds[-50:]) == pytest.approx(3.0, rel=0.15)
    assert np.mean(unclipped[-50:]) == pytest.approx(0.5, abs=0.08)


def test_canaries_half_inserted_unit_directions_sampled_like_clients():
    inserted = canary_inserted(seed=3, count=40)
    assert inserted.sum() == 20 and (canary_inserted(3, 40) == inserted).all()
    direction = canary_direction(seed=3, index=5, size=1000)
    assert np.linalg.norm(direction) == pytest.approx(1.0)
    assert abs(direction @ canary_direction(3, 6, 1000)) < 0.2  # nearly orthogonal
    # no client, no noise: the shadow release is exactly C / qN times the sum of the
    # inserted canaries that Poisson sampling picked; the reported model never moves
    strategy = DPFedAvg(sample_rate=0.5, noise_multiplier=0.0, clipping_norm=2.0,
                        canaries=40, canary_seed=3, min_available_nodes=1)
    zero = ArrayRecord({"w": Array(np.zeros((50, 20), np.float32)),
                        "b": Array(np.zeros(20, np.float32))})
    list(strategy.configure_train(1, zero, ConfigRecord(), Nodes(10)))
    new, metrics = strategy.aggregate_train(1, [])
    assert not new["w"].numpy().any() and not new["b"].numpy().any()
    release = strategy.canary_release()
    moved = np.concatenate([release["w"].ravel(), release["b"].ravel()])
    count = metrics[dp_fedavg.CANARY_UPDATES]
    assert 3 < count < 17 and metrics[dp_fedavg.COHORT] == 0
    assert metrics[dp_fedavg.UNCLIPPED] == 0  # canaries are not counted as clients
    directions = np.stack([canary_direction(3, i, 1020) for i in range(40)], axis=1)
    weights, *_ = np.linalg.lstsq(directions[:, inserted], moved, rcond=None)
    picked = np.isclose(weights, 2.0 / (0.5 * 10), atol=1e-4)
    assert picked.sum() == count and np.allclose(weights[~picked], 0, atol=1e-4)
    # held-out canaries never enter: the release has no component outside the inserted span
    residual = moved - directions[:, inserted] @ weights
    assert np.linalg.norm(residual) < 1e-4


@pytest.mark.parametrize("optimizer", [{"server_momentum": 0.9, "server_learning_rate": 2.0},
                                       {"server_optimizer": "adam"}])
def test_canaries_never_enter_the_reported_model(optimizer):
    """With noise and a server optimizer, the reported models of a run with canary clients
    are bit-identical to those of a run without (seeded noise: the same draws in both runs);
    the shadow release differs by exactly the canaries' propagated share."""
    common = {"sample_rate": 0.5, "noise_multiplier": 1.0, "clipping_norm": 0.5,
              "min_available_nodes": 1, "seed": 0, **optimizer}
    plain = _play(DPFedAvg(**common), rounds=3, clients=6, seed=7)
    audited = DPFedAvg(canaries=30, canary_seed=1, **common)
    with_canaries = _play(audited, rounds=3, clients=6, seed=7)
    for a, b in zip(plain, with_canaries, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    release = audited.canary_release()
    assert set(release) == {"w", "b"}  # floating arrays only
    assert not np.allclose(release["w"], with_canaries[-1]["w"])


CENTRAL = [*MLP_DIGITS, "privacy.mode=central", "privacy.noise_multiplier=0.1",
           "privacy.delta=0.01"]


@pytest.mark.parametrize("name, expected", [
    ("fedavg", {"server_optimizer": "sgd", "server_learning_rate": 1.0, "server_momentum": 0.0}),
    ("fedavgm", {"server_optimizer": "sgd", "server_learning_rate": 3.0,
                 "server_momentum": 0.8}),
    ("fedadam", {"server_optimizer": "adam", "server_learning_rate": 0.02,
                 "adam_betas": (0.9, 0.99), "adam_tau": 1e-3}),
])
def test_the_configured_strategy_picks_the_server_optimizer(name, expected):
    settings = {"fedavg": [], "fedavgm": ["strategy.server_lr=3", "strategy.server_momentum=0.8"],
                "fedadam": ["strategy.fedopt_eta=0.02"]}[name]
    config = load_config(None, [*CENTRAL, f"strategy.name={name}", *settings])
    assert server_optimizer(config) == expected
    plan = CentralDP().plan(config)
    strategy = CentralDP().strategy(config, plan, {})
    assert strategy.server_optimizer == expected["server_optimizer"]
    assert strategy.server_learning_rate == expected["server_learning_rate"]


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=fedprox"], "strategy.name = 'fedprox' is not allowed with privacy.mode "
                                "= 'central': must be 'fedavg', 'fedavgm', 'fedadam'"),
    (["privacy.clip_norm=inf"], "privacy.clip_norm = inf is not allowed with noise"),
    (["privacy.noise_multiplier=0", "privacy.target_epsilon=inf", "privacy.clip_norm=inf",
      "privacy.audit=true"], "privacy.clip_norm = inf is not allowed with privacy.audit"),
])
def test_bad_central_settings_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*CENTRAL, *overrides])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_small_cohort_gives_the_count_a_tenth_of_the_budget_and_a_too_small_std_is_refused():
    """Cohort 1 of 4 with σ = 1: Andrew et al.'s std (cohort / 20) would take the budget 400
    times over; the automatic share caps the count at 0.1, so σ_Δ = σ / sqrt(0.9)."""
    plan = CentralDP().plan(load_config(None, [*CENTRAL, "privacy.noise_multiplier=1"]))
    assert plan.details["count_budget_share"] == pytest.approx(0.1)
    assert plan.details["update_noise_multiplier"] == pytest.approx(1 / math.sqrt(0.9))
    config = load_config(None, [*CENTRAL, "privacy.noise_multiplier=1",
                                "privacy.clipped_count_stddev=0.4"])
    with pytest.raises(ConfigError, match="choose privacy.count_budget_share"):
        CentralDP().plan(config)


@pytest.mark.slow
def test_a_thousand_clients_in_cohorts_of_a_hundred(tmp_path):
    """Cross-device scale in process: 1,000 clients, Poisson cohorts of about 100, DP-FedAvgM
    with adaptive clipping and canary clients; every file of the run directory holds up."""
    import json

    from fedtune.engine.inprocess import run_inprocess
    from tests.conftest import rows_of, tiny_config

    config = tiny_config(tmp_path, "data.num_clients=1000", "data.partitioner=iid",
                         "data.local_test_fraction=0", "strategy.fraction_train=0.1",
                         "strategy.fraction_evaluate=0", "strategy.name=fedavgm",
                         "run.rounds=3", "client.local_steps=1", "privacy.mode=central",
                         "privacy.noise_multiplier=1", "privacy.delta=1e-4",
                         "privacy.audit=true", "privacy.audit_canaries=200")
    run_dir = run_inprocess(config).path
    metrics = rows_of(run_dir / "metrics.csv")
    sampled = [int(r["clients_sampled"]) for r in metrics]
    assert all(70 < n < 130 for n in sampled) and len(set(sampled)) > 1  # Poisson, ~100
    assert len(rows_of(run_dir / "clients.csv")) == sum(sampled)
    assert len(rows_of(run_dir / "partitions.csv")) == 1000
    assert all(float(r["noise_std"]) > 0 and float(r["clip_norm"]) > 0 for r in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"]["num_clients"] == 1000
    assert summary["privacy"]["rounds_accounted"] == 3
    assert json.loads((run_dir / "audit.json").read_text())["canaries"] == 200
