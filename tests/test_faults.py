"""[faults]: which clients misbehave, what they send, and what robust aggregation does about it."""

from __future__ import annotations

import json

import numpy as np

from fedtune.engine.launch import run_inprocess
from fedtune.faults import FaultPlan, draw_clients
from tests.conftest import tiny_config


def test_scaled_clients_are_a_seeded_fraction():
    first = draw_clients(10, 0.2, seed=0, stream=1)
    assert len(first) == 2 and first <= set(range(10))
    assert draw_clients(10, 0.2, seed=0, stream=1) == first
    assert len({draw_clients(10, 0.2, seed=s, stream=1) for s in range(20)}) > 5
    assert len(draw_clients(10, 0.25, seed=0, stream=1)) == 3  # rounded half up
    assert draw_clients(10, 0.0, seed=0, stream=1) == frozenset()


def test_a_scaled_client_sends_the_global_model_plus_its_update_times_the_factor():
    plan = FaultPlan(frozenset({3}), -10.0)
    x = {"w": np.array([1.0, 2.0], np.float32)}
    y = {"w": np.array([1.5, 1.0], np.float32)}
    np.testing.assert_allclose(plan.corrupt_update(3, x, y)["w"], [-4.0, 12.0])
    assert plan.corrupt_update(3, x, y)["w"].dtype == np.float32
    assert plan.corrupt_update(2, x, y) is y


def _final_accuracy(tmp_path, name, fraction):
    config = tiny_config(tmp_path, f"strategy.name={name}", "data.num_clients=10",
                         "run.rounds=5", "strategy.fraction_evaluate=0",
                         f"faults.scale_fraction={fraction}",
                         f"run.dir={tmp_path / f'{name}-{fraction}'}")
    summary = json.loads((run_inprocess(config).path / "summary.json").read_text())
    assert len(summary["faults"]["scaled_clients"]) == round(10 * fraction)
    return summary["final"]["eval_accuracy"]


def test_rfa_withstands_20_percent_of_clients_scaling_updates_by_minus_10(tmp_path,
                                                                        one_torch_thread):
    """MLP on digits, 10 IID clients all training every round, 2 of them send x - 10 (y - x)."""
    fedavg_clean = _final_accuracy(tmp_path, "fedavg", 0.0)
    fedavg_attacked = _final_accuracy(tmp_path, "fedavg", 0.2)
    rfa_clean = _final_accuracy(tmp_path, "rfa", 0.0)
    rfa_attacked = _final_accuracy(tmp_path, "rfa", 0.2)
    print(f"fedavg {fedavg_clean:.4f} -> {fedavg_attacked:.4f}, "
          f"rfa {rfa_clean:.4f} -> {rfa_attacked:.4f}")
    assert fedavg_clean > 0.7 and rfa_clean > 0.7
    assert fedavg_attacked < 0.2  # collapsed to about chance (10 classes)
    assert rfa_attacked > rfa_clean - 0.05
