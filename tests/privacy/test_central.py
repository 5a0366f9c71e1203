"""Central DP: DP-FedAvg's mechanism against Flower's wrapper, clipping, noise, budget, runs."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from opacus.accountants import RDPAccountant

from fedtune.engine.inprocess import run_inprocess
from fedtune.privacy.accounting import noise_for_target
from fedtune.privacy.central_dp import CentralBudget
from strategies.dp_fedavg import DPFedAvg
from tests.conftest import tiny_config

SHAPES = {"w": (6, 4), "b": (4,)}


@pytest.fixture(autouse=True)
def server_identity():
    """Messages take their source from the process's task identity (as in a ServerApp)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _reply(arrays: dict[str, np.ndarray], weight: int = 10) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": weight, "train-loss": 0.5}),
    })
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _dp_fedavg(current: dict[str, np.ndarray], population: int, **kwargs) -> DPFedAvg:
    strategy = DPFedAvg(min_available_nodes=1, **kwargs)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    strategy.population = population
    return strategy


def test_without_noise_dp_fedavg_equals_flowers_fixed_clipping_wrapper():
    rng = np.random.default_rng(0)
    current = _arrays(rng)
    # 4 updates, two far outside the bound; equal weights; cohort = q * N = 0.5 * 8
    replies = [_reply({k: current[k] + _arrays(rng, scale)[k] for k in SHAPES})
               for scale in (0.05, 3.0, 0.1, 10.0)]
    flower = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=4)
    flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    expected, _ = flower.aggregate_train(1, copy.deepcopy(replies))
    ours, _ = _dp_fedavg(current, 8, sample_rate=0.5, noise_multiplier=0.0,
                         clipping_norm=1.0).aggregate_train(1, replies)
    for name in SHAPES:
        np.testing.assert_allclose(_numpy(ours)[name], _numpy(expected)[name], rtol=1e-5,
                                   atol=1e-6)


def test_clipping_bounds_every_update_norm():
    rng = np.random.default_rng(1)
    current = _arrays(rng)
    for scale, clip in ((10.0, 1.0), (0.01, 1.0), (3.0, 0.2)):
        step = _arrays(rng, scale)
        reply = _reply({k: current[k] + step[k] for k in SHAPES})
        # one client, q = 1: the new model minus the old is exactly its clipped update
        new, metrics = _dp_fedavg(current, 1, sample_rate=1.0, noise_multiplier=0.0,
                                  clipping_norm=clip).aggregate_train(1, [reply])
        moved = np.sqrt(sum(float(np.sum((_numpy(new)[k] - current[k]) ** 2)) for k in SHAPES))
        raw = np.sqrt(sum(float(np.sum(step[k].astype(np.float64) ** 2)) for k in SHAPES))
        assert moved == pytest.approx(min(raw, clip), rel=1e-4)
        assert metrics["dp-unclipped"] == int(raw <= clip)


def test_a_zero_update_is_aggregated_not_divided_by_its_norm():
    """A client whose model did not move (e.g. saturated logits give zero gradients after a
    noisy round) sends a zero update; it counts as unclipped and adds nothing."""
    rng = np.random.default_rng(6)
    current = _arrays(rng)
    new, metrics = _dp_fedavg(current, 2, sample_rate=1.0, noise_multiplier=0.0,
                              clipping_norm=1.0).aggregate_train(1, [_reply(current)] * 2)
    for name in SHAPES:
        np.testing.assert_array_equal(_numpy(new)[name], current[name])
    assert metrics["dp-unclipped"] == 2


def test_noise_std_is_sigma_c_over_expected_cohort_and_empty_cohorts_are_noised():
    rng = np.random.default_rng(2)
    current = {"w": np.zeros((200, 200), dtype=np.float32)}
    strategy = DPFedAvg(min_available_nodes=1, sample_rate=0.2, noise_multiplier=1.5,
                        clipping_norm=0.8)
    strategy.current_arrays = ArrayRecord({"w": Array(current["w"])})
    strategy.population = 30
    new, metrics = strategy.aggregate_train(3, [])  # nobody sampled: still a noised release
    assert metrics["dp-cohort"] == 0
    assert np.std(_numpy(new)["w"]) == pytest.approx(1.5 * 0.8 / (0.2 * 30), rel=0.02)
    # secret noise: the same round released twice carries unrelated noise
    again, _ = strategy.aggregate_train(3, [])
    assert abs(np.corrcoef(_numpy(again)["w"].ravel(), _numpy(new)["w"].ravel())[0, 1]) < 0.02
    # the insecure, reproducible mode repeats a round's noise exactly
    seeded = DPFedAvg(min_available_nodes=1, sample_rate=0.2, noise_multiplier=1.5,
                      clipping_norm=0.8, seed=4)
    seeded.current_arrays, seeded.population = strategy.current_arrays, 30
    first, _ = seeded.aggregate_train(3, [])
    second, _ = seeded.aggregate_train(3, [])
    np.testing.assert_array_equal(_numpy(first)["w"], _numpy(second)["w"])
    del rng


def test_poisson_sampling_picks_each_client_with_probability_q():
    class Nodes:
        def get_node_ids(self):
            return range(100, 300)

    strategy = DPFedAvg(min_available_nodes=1, sample_rate=0.3, noise_multiplier=1.0,
                        clipping_norm=1.0, seed=5)
    sizes = [len(list(strategy.configure_train(r, ArrayRecord(), _config(), Nodes())))
             for r in range(1, 41)]
    assert len(set(sizes)) > 5  # the cohort size varies (Poisson), unlike Flower's sampling
    assert np.mean(sizes) / 200 == pytest.approx(0.3, abs=0.02)
    again = [len(list(strategy.configure_train(r, ArrayRecord(), _config(), Nodes())))
             for r in range(1, 41)]
    assert again == sizes


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord()


def test_adaptive_clipping_moves_the_bound_geometrically():
    rng = np.random.default_rng(3)
    current = _arrays(rng)
    small = [_reply({k: current[k] + _arrays(rng, 0.001)[k] for k in SHAPES}) for _ in range(4)]
    strategy = _dp_fedavg(current, 4, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=1.0,
                          adaptive=True, target_quantile=0.5, clip_learning_rate=0.2)
    strategy.aggregate_train(1, small)
    # every update unclipped (share 1): C <- C * exp(-0.2 * (1 - 0.5))
    assert strategy.clipping_norm == pytest.approx(math.exp(-0.1))


def test_budget_stops_before_the_target_would_be_exceeded():
    budget = CentralBudget(noise_multiplier=2.0, sample_rate=0.3, delta=1e-5, mechanism="rdp",
                           target_epsilon=3.0)
    rounds = 0
    while budget.next_round_fits():
        budget.record_round()
        rounds += 1
        assert budget.epsilon <= 3.0
    assert 1 < rounds < 200
    assert budget.epsilon_after_next() > 3.0
    assert "stopped before round" in budget.stop_reason(rounds + 1)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_central_run_reports_epsilon_every_round_as_opacus_computes_it(tmp_path):
    config = tiny_config(tmp_path, "privacy.mode=central", "privacy.noise_multiplier=0.8",
                         "strategy.fraction_train=0.5", "run.rounds=3", "privacy.delta=0.01",
                         "privacy.adaptive_clipping=false", "privacy.clip_norm=0.5")
    run_dir = run_inprocess(config).path
    metrics = _rows(run_dir / "metrics.csv")
    accountant = RDPAccountant()
    for row in metrics:
        accountant.step(noise_multiplier=0.8, sample_rate=0.5)
        assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(delta=0.01),
                                                      rel=1e-4)
        assert row["max_client_epsilon"] == ""
        # fixed clipping: the bound, no released clipped share, noise σC / qN per coordinate
        assert float(row["clip_norm"]) == 0.5 and row["clipped_fraction"] == ""
        assert float(row["noise_std"]) == pytest.approx(0.8 * 0.5 / (0.5 * 4), rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"]["delta"] == 0.01 and summary["privacy"]["accountant"] == "rdp"
    assert summary["privacy"]["epsilon"] == pytest.approx(float(metrics[-1]["epsilon"]))
    assert (run_dir / "plots" / "epsilon.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_central_run_never_reports_epsilon_above_its_target(tmp_path):
    config = tiny_config(tmp_path, "privacy.mode=central", "privacy.target_epsilon=2",
                         "strategy.fraction_train=0.5", "run.rounds=4", "privacy.delta=0.01",
                         "privacy.accountant=prv", "privacy.adaptive_clipping=false")
    run_dir = run_inprocess(config).path
    epsilons = [float(r["epsilon"]) for r in _rows(run_dir / "metrics.csv")]
    assert len(epsilons) == 4 and epsilons == sorted(epsilons)
    assert max(epsilons) <= 2.0 and epsilons[-1] > 1.9  # the noise spends the budget


def test_a_run_with_a_target_records_the_noise_it_derived_and_the_clip_norms(tmp_path):
    """σ is fixed once from the target and the accountant; summary.json records it, and what
    DP-FedAvg released each round is in strategy_metrics.jsonl."""
    config = tiny_config(tmp_path, "privacy.mode=central", "privacy.target_epsilon=4",
                         "strategy.fraction_train=0.5", "run.rounds=3", "privacy.delta=0.01",
                         "privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=1",
                         "privacy.clip_norm=1")
    run_dir = run_inprocess(config).path
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    expected = noise_for_target(4.0, 0.01, 0.5, 3, "rdp")
    assert summary["noise_multiplier"] == pytest.approx(expected) and expected > 0.5
    assert summary["sample_rate"] == 0.5 and summary["rounds_accounted"] == 3
    lines = [json.loads(line) for line in
             (run_dir / "strategy_metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    clip_norms = [line["train"]["dp-clip-norm"] for line in lines]
    assert clip_norms[0] == 1.0 and len(set(clip_norms)) == 3  # adaptive: it moves each round
    # metrics.csv has the same bounds and the clipped share from the noised count
    rows = _rows(run_dir / "metrics.csv")
    assert [float(r["clip_norm"]) for r in rows] == pytest.approx(clip_norms, rel=1e-5)
    released = [line["train"]["dp-clipped-fraction"] for line in lines]
    assert [float(r["clipped_fraction"]) for r in rows] == pytest.approx(released, rel=1e-5)
    # the bound moved as the released share says: C' = C exp(-0.2 ((1 - share) - 0.5))
    for (before, after), share in zip(zip(clip_norms, clip_norms[1:]), released):
        assert after == pytest.approx(before * math.exp(-0.2 * ((1 - share) - 0.5)))
    assert summary["adaptive_clipping"] is True and summary["accountant_library"].startswith("opacus")
    assert summary["clipped_count_stddev"] == 1.0
    sigma = summary["noise_multiplier"]
    assert summary["update_noise_multiplier"] == pytest.approx((sigma ** -2 - 2 ** -2) ** -0.5)
