"""[faults]: which clients misbehave, what they send, and what robust aggregation does about it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.engine.inprocess import run_inprocess
from fedtune.faults import FaultPlan, InjectedCrash, draw_clients
from tests.conftest import tiny_config


def test_faulty_clients_are_a_seeded_fraction():
    first = draw_clients(10, 0.2, seed=0, stream=1)
    assert len(first) == 2 and first <= set(range(10))
    assert draw_clients(10, 0.2, seed=0, stream=1) == first
    assert len({draw_clients(10, 0.2, seed=s, stream=1) for s in range(20)}) > 5
    assert len(draw_clients(10, 0.25, seed=0, stream=1)) == 3  # rounded half up
    assert draw_clients(10, 0.0, seed=0, stream=1) == frozenset()


def _final_accuracy(tmp_path, name, fraction):
    attack = ["attack.name=scaling", f"attack.fraction={fraction}"] if fraction else []
    config = tiny_config(tmp_path, f"strategy.name={name}", "data.num_clients=10",
                         "run.rounds=5", "strategy.fraction_evaluate=0", *attack,
                         f"run.dir={tmp_path / f'{name}-{fraction}'}")
    summary = json.loads((run_inprocess(config).path / "summary.json").read_text())
    assert len(summary["attack"].get("attackers", [])) == round(10 * fraction)
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


def test_crashes_delays_and_bad_updates_follow_the_seed():
    plan = FaultPlan(crash_probability=0.3, seed=7, straggler_clients=frozenset({1, 2}),
                     straggler_delay="exponential", straggler_delay_s=2.0)
    draws = [plan.crashes(c, r) for r in range(1, 201) for c in range(10)]
    assert draws == [plan.crashes(c, r) for r in range(1, 201) for c in range(10)]
    assert 0.26 < np.mean(draws) < 0.34  # 2,000 draws at p = 0.3
    client, server_round = _first_crash(plan)
    with pytest.raises(InjectedCrash, match=f"client {client} crashed in round {server_round} "
                                            r"\(faults.crash_probability = 0.3\)"):
        plan.check_crash(client, server_round)
    delays = [plan.delay_s(1, r) for r in range(1, 2001)]
    assert plan.delay_s(0, 1) == 0.0 and delays == [plan.delay_s(1, r) for r in range(1, 2001)]
    assert 1.8 < np.mean(delays) < 2.2 and min(delays) < 0.5  # exponential, mean 2 s
    constant = FaultPlan(straggler_clients=frozenset({1}), straggler_delay_s=1.5)
    assert constant.delay_s(1, 3) == 1.5


def _first_crash(plan: FaultPlan) -> tuple[int, int]:
    return next((c, r) for r in range(1, 100) for c in range(10) if plan.crashes(c, r))


def test_nan_and_wrong_shape_updates_change_the_first_tensor():
    x = {"steps": np.array([3]), "w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    y = {name: value + 1 for name, value in x.items()}
    plan = FaultPlan(nan_clients=frozenset({1}), wrong_shape_clients=frozenset({2}))
    nan = plan.corrupt_update(1, y)
    assert np.isnan(nan["w"]).all() and nan["w"].dtype == np.float32
    assert np.array_equal(nan["steps"], y["steps"]) and np.array_equal(nan["b"], y["b"])
    assert plan.corrupt_update(2, y)["steps"].shape == (0,)
    assert plan.corrupt_update(3, y) is y


def test_crashing_and_nan_clients_never_stop_the_run_and_every_client_is_accounted(tmp_path):
    """Issue 8: 30% of clients crash at random, 10% send NaN, 10% the wrong shape; 10 rounds."""
    config = tiny_config(tmp_path, "data.num_clients=10", "run.rounds=10",
                         "faults.crash_probability=0.3", "faults.nan_fraction=0.1",
                         "faults.wrong_shape_fraction=0.1", "run.max_rounds_without_update=2")
    run_dir = run_inprocess(config).path
    plan = FaultPlan.from_config(config)
    metrics = list(csv.DictReader((run_dir / "metrics.csv").open()))
    clients = list(csv.DictReader((run_dir / "clients.csv").open()))
    assert [int(row["round"]) for row in metrics] == list(range(1, 11))
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(np.isfinite(value).all() for value in weights.values())
    assert all(np.isfinite(float(row["eval_loss"])) for row in metrics)
    for row in metrics:
        in_round = [c for c in clients if c["round"] == row["round"]]
        assert len(in_round) == int(row["clients_sampled"]) == 10
        assert sorted(int(c["client_id"]) for c in in_round) == list(range(10))
        assert sum(c["status"] == "ok" for c in in_round) == int(row["clients_ok"])
        for c in in_round:
            client, server_round = int(c["client_id"]), int(c["round"])
            if plan.crashes(client, server_round):
                assert c["status"] == "failed" and "injected fault" in c["reason"]
            elif client in plan.nan_clients:
                assert c["status"] == "rejected" and "non-finite" in c["reason"]
            elif client in plan.wrong_shape_clients:
                assert c["status"] == "rejected" and "instead of" in c["reason"]
            else:
                assert c["status"] == "ok", c
    failed = sum(c["status"] == "failed" for c in clients)
    assert 15 <= failed <= 45  # about 30 of the 100 client-rounds
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults"]["nan_clients"] == sorted(plan.nan_clients) != []
    assert summary["final"]["eval_accuracy"] > 0.5  # the sound clients still learned


def test_fault_fractions_that_pick_nobody_are_refused(tmp_path):
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="faults.nan_fraction = 0.01 is not allowed with "
                                          "data.num_clients = 4: must pick at least one client"):
        tiny_config(tmp_path, "faults.nan_fraction=0.01")
    with pytest.raises(ConfigError, match="faults.straggler_delay = 'gamma' is not allowed"):
        tiny_config(tmp_path, "faults.straggler_delay=gamma")


def test_inprocess_runtime_times_each_client_on_its_own(tmp_path):
    """In process the clients run one after another: a straggler slower than
    strategy.round_timeout_s is the one reported as timeout; the honest clients after it are
    not, and its late reply is not aggregated."""
    config = tiny_config(tmp_path, "run.rounds=1", "faults.straggler_fraction=0.25",
                         "faults.straggler_delay_s=2.5", "strategy.round_timeout_s=1.5",
                         "strategy.fraction_evaluate=0")
    run_dir = run_inprocess(config).path
    summary = json.loads((run_dir / "summary.json").read_text())
    (slow,) = summary["faults"]["straggler_clients"]
    with (run_dir / "clients.csv").open() as handle:
        rows = {int(r["client_id"]): (r["status"], r["reason"]) for r in csv.DictReader(handle)}
    assert rows.pop(slow)[0] == "timeout"
    assert set(rows.values()) == {("ok", "")} and len(rows) == 3
