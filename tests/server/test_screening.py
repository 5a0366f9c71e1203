"""Bad replies are rejected with a reason and never aggregated; nothing is unpickled."""

from __future__ import annotations

import csv
import io
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtune.client import app as fedtune_client
from fedtune.config import to_run_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.server.app import run_federated
from fedtune.server.screening import check_evaluate_reply, check_train_reply
from fedtune.tables.strategies import STRATEGIES
from strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from tests.conftest import tiny_config

WEIGHTS = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _record(arrays):
    return ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})


def _exchange(arrays, metrics):
    sent = Message(RecordDict({"arrays": _record(WEIGHTS), "config": ConfigRecord()}), 1001,
                   "train")
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = _record(arrays)
    return sent, Message(content, reply_to=sent)


GOOD_METRICS = {"num-examples": 10, "train-loss": 0.5}


def _pickled_array():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())


@pytest.mark.parametrize("arrays, metrics, reason", [
    ({"w": WEIGHTS["w"]}, GOOD_METRICS, "tensor names differ"),
    ({**WEIGHTS, "extra": np.ones(1, np.float32)}, GOOD_METRICS, "tensor names differ"),
    ({**WEIGHTS, "b": np.zeros(3, np.float32)}, GOOD_METRICS, "arrays.b: float32[3] instead of"),
    ({**WEIGHTS, "b": np.zeros(2, np.float64)}, GOOD_METRICS, "float64[2] instead of float32[2]"),
    ({**WEIGHTS, "w": np.full((3, 2), np.nan, np.float32)}, GOOD_METRICS, "non-finite"),
    ({**WEIGHTS, "b": np.array([np.inf, 0], np.float32)}, GOOD_METRICS, "non-finite"),
    ({**WEIGHTS, "b": _pickled_array()}, GOOD_METRICS, "unreadable array"),
    (WEIGHTS, {"num-examples": -5, "train-loss": 0.5}, "outside 1..100"),
    (WEIGHTS, {"num-examples": 10**6, "train-loss": 0.5}, "outside 1..100"),
    (WEIGHTS, {"num-examples": 2.5, "train-loss": 0.5}, "is not an integer"),
    (WEIGHTS, {"train-loss": 0.5}, "no 'num-examples'"),
    (WEIGHTS, {"num-examples": 10, "train-loss": float("nan")}, "'train-loss' is not finite"),
    (None, GOOD_METRICS, "no arrays"),
])
def test_bad_train_replies_are_named(arrays, metrics, reason):
    sent, reply = _exchange(arrays, metrics)
    problem = check_train_reply(sent, reply, max_examples=100)
    assert problem is not None and reason in problem


def test_sound_reply_passes_and_pickles_are_never_loaded(monkeypatch):
    sent, reply = _exchange(WEIGHTS, GOOD_METRICS)
    assert check_train_reply(sent, reply, max_examples=100) is None
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    sent, reply = _exchange({**WEIGHTS, "b": _pickled_array()}, GOOD_METRICS)
    assert "unreadable" in check_train_reply(sent, reply, max_examples=100)


def test_scaffold_control_change_is_checked_against_the_control_sent():
    control = {k: np.zeros_like(v) for k, v in WEIGHTS.items()}
    sent = Message(RecordDict({"arrays": _record(WEIGHTS), CONTROL_KEY: _record(control),
                               "config": ConfigRecord()}), 1001, "train")

    def reply(delta):
        return Message(RecordDict({"arrays": _record(WEIGHTS), CONTROL_DELTA_KEY: _record(delta),
                                   "metrics": MetricRecord(GOOD_METRICS)}), reply_to=sent)

    answers = STRATEGIES["scaffold"].answers
    assert answers == {CONTROL_DELTA_KEY: CONTROL_KEY}  # the table names strategies' own keys
    assert check_train_reply(sent, reply(control), 100, answers) is None
    wrong = {**control, "b": np.zeros(5, np.float32)}
    assert "scaffold-control-delta.b: float32[5] instead of float32[2]" in check_train_reply(
        sent, reply(wrong), 100, answers)
    assert "'scaffold-control-delta' was not sent" in check_train_reply(
        sent, reply(control), 100)  # without the strategy's answers, nothing answers
    plain_sent, plain_reply = _exchange(WEIGHTS, GOOD_METRICS)  # a FedAvg instruction
    plain_reply.content[CONTROL_DELTA_KEY] = _record(control)
    assert "'scaffold-control' was not sent" in check_train_reply(plain_sent, plain_reply,
                                                                  100, answers)


def test_evaluate_replies_need_finite_metrics():
    sent = Message(RecordDict({"config": ConfigRecord()}), 1001, "evaluate")
    good = Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "eval-loss": 1.0})}),
                   reply_to=sent)
    bad = Message(RecordDict({"metrics": MetricRecord({"num-examples": 4,
                                                       "eval-loss": float("inf")})}),
                  reply_to=sent)
    assert check_evaluate_reply(good, 10) is None
    assert "not finite" in check_evaluate_reply(bad, 10)


def poisoning_client_app(poisoned: set[int]) -> ClientApp:
    """fedtune's ClientApp, except that the listed clients send NaN in one tensor."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = fedtune_client.train(msg, context)
        if context.node_config["partition-id"] in poisoned:
            arrays = reply.content["arrays"]
            name = next(iter(arrays))
            arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
        return reply

    app.evaluate()(fedtune_client.evaluate_local)
    return app


def test_a_poisoned_reply_is_rejected_and_the_run_goes_on(tmp_path):
    config = tiny_config(tmp_path, "run.rounds=2")
    grid = InProcessGrid(poisoning_client_app({1}), to_run_config(config), 4)
    run_dir = run_federated(grid, config).path
    rows = list(csv.DictReader((run_dir / "clients.csv").open()))
    statuses = {(r["round"], r["client_id"]): (r["status"], r["reason"]) for r in rows}
    assert statuses[("1", "1")][0] == "rejected" and "non-finite" in statuses[("1", "1")][1]
    assert statuses[("2", "1")][0] == "rejected"
    assert sum(status == "ok" for status, _ in statuses.values()) == 6
    metrics = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [m["clients_ok"] for m in metrics] == ["3", "3"]
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in model.values())


def test_rounds_without_sound_updates_stop_the_run_with_reasons(tmp_path):
    config = tiny_config(tmp_path, "run.rounds=5", "run.max_rounds_without_update=2")
    grid = InProcessGrid(poisoning_client_app({0, 1, 2, 3}), to_run_config(config), 4)
    with pytest.raises(RuntimeError, match="2 rounds in a row without enough sound client "
                                           "updates.*non-finite"):
        run_federated(grid, config)
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [m["clients_ok"] for m in metrics] == ["0"]  # round 1 kept, nothing lost
