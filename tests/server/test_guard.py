"""The model guard: update-norm bounds, and a global model that is never non-finite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtune.engine.inprocess import run_inprocess
from fedtune.server.checkpoint import read_checkpoint
from fedtune.server.guard import bound_updates, robust_z, update_norm
from fedtune.server.loop import RunFailed
from fedtune.server.round import aggregate_checked
from tests.conftest import rows_of, tiny_config

GLOBAL = {"w": np.zeros(4, np.float32), "steps": np.array([3], np.int64)}


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _reply(w, client=0):
    sent = Message(RecordDict({"config": ConfigRecord()}), 1001, "train")
    arrays = ArrayRecord({"w": Array(np.asarray(w, np.float32)), "steps": Array(GLOBAL["steps"])})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 10, "partition-id": client})}), reply_to=sent)


def test_updates_are_clipped_to_the_bound_and_outliers_rejected_by_robust_z():
    honest = [_reply(np.full(4, 0.5 + 0.01 * i)) for i in range(6)]  # norms 1.0 .. 1.1
    boosted = _reply(np.full(4, -50.0))  # norm 100
    kept, rejected = bound_updates(GLOBAL, [*honest, boosted], max_norm=0.0, z_limit=3.0)
    assert kept == honest and [reply for reply, _ in rejected] == [boosted]
    assert "update norm 100 is an outlier: robust z-score" in rejected[0][1]
    assert "> strategy.update_norm_z = 3" in rejected[0][1]
    kept, rejected = bound_updates(GLOBAL, [*honest, _reply(np.full(4, -50.0))], 0.5, 0.0)
    assert not rejected
    for reply in kept:  # every update (all above 0.5) now has norm 0.5, direction kept
        assert update_norm(GLOBAL, reply.content["arrays"]) == pytest.approx(0.5, rel=1e-6)
        np.testing.assert_array_equal(reply.content["arrays"]["steps"].numpy(), [3])
    assert kept[-1].content["arrays"]["w"].numpy()[0] == pytest.approx(-0.25)
    assert list(robust_z([1.0, 1.0, 1.0])) == [0.0, 0.0, 0.0]  # no spread, no outlier


def test_a_non_finite_aggregate_is_refused_and_the_old_model_kept():
    """A server step that overflows float32 (FedAvgM-like, 10 x the mean of huge updates)."""
    class Overshooting(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            arrays["w"] = Array(arrays["w"].numpy() * np.float32(10))
            return arrays, metrics

    previous = ArrayRecord({"w": Array(np.zeros(4, np.float32)),
                            "steps": Array(GLOBAL["steps"])})
    replies = [_reply(np.full(4, 3e38), client) for client in (0, 1)]
    with np.errstate(over="ignore"):
        kept, _, problem = aggregate_checked(Overshooting(), 1, replies, previous)
    assert kept is previous and problem == "the aggregate is not finite (in w)"


def test_a_failing_strategy_fails_the_round_not_the_run():
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise ValueError("bad input")

    previous = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    kept, _, problem = aggregate_checked(Broken(), 1, [_reply(np.ones(4))], previous)
    assert kept is previous
    assert problem == "the strategy's aggregation failed (ValueError: bad input)"


def test_rounds_with_a_non_finite_aggregate_keep_the_model_then_stop_the_run(tmp_path):
    """FedAvgM with server_lr = 1e300: its update overflows float32. The model stays as it
    was, each round is recorded as kept, and the run stops with the reason; nothing finished
    is lost and the checkpoint holds finite weights."""
    config = tiny_config(tmp_path, "strategy.name=fedavgm", "strategy.server_lr=1e300",
                         "run.rounds=4", "run.max_rounds_without_update=2")
    with pytest.raises(RunFailed, match="2 rounds in a row without an update of the global "
                                        r"model .*kept: the aggregate is not finite"):
        run_inprocess(config)
    run_dir = tmp_path / "run"
    metrics = rows_of(run_dir / "metrics.csv")
    assert [m["model_update"] for m in metrics] == ["kept: the aggregate is not finite (in "
                                                    "body.0.weight, body.0.bias, "
                                                    "classifier.weight)"]
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint.server_round == 1
    assert all(np.isfinite(v).all() for v in checkpoint.global_arrays.values())
    assert not (run_dir / "summary.json").exists()


def test_robust_z_rejects_the_scaling_attack(tmp_path, one_torch_thread):
    """MLP on digits, 10 clients, 2 send x - 10 (y - x): update_norm_z rejects exactly those
    two every round, and FedAvg keeps learning (without it: about chance, 0.1)."""
    config = tiny_config(tmp_path, "data.num_clients=10", "run.rounds=5",
                         "strategy.fraction_evaluate=0", "attack.name=scaling",
                         "attack.fraction=0.2",
                         "strategy.update_norm_z=3")
    run_dir = run_inprocess(config).path
    summary = json.loads((run_dir / "summary.json").read_text())
    scaled = set(summary["attack"]["attackers"])
    rows = rows_of(run_dir / "clients.csv")
    rejected = {(int(r["round"]), int(r["client_id"])) for r in rows if r["status"] == "rejected"}
    assert rejected == {(r, c) for r in range(1, 6) for c in scaled}
    assert all("is an outlier: robust z-score" in r["reason"] for r in rows
               if r["status"] == "rejected")
    assert summary["final"]["eval_accuracy"] > 0.7
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in model.values())
