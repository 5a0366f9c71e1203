"""Every reply is checked against the exact schema; a bad one is rejected with a reason and never
aggregated, and the run goes on. Nothing received is unpickled."""

from __future__ import annotations

import csv
import io
import math
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtune import protocol
from fedtune.client import app as fedtune_client
from fedtune.config import to_run_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.protocol import decline_reply_schema, train_reply_schema
from fedtune.server.app import run_federated
from fedtune.server.screening import (
    ReplyLimits,
    check_decline,
    check_evaluate_reply,
    check_metric_rows,
    check_metric_values,
    check_train_reply,
)
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES
from strategies.fednova import NORMALIZER_KEY
from strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from tests import hostile_client as hostile
from tests.conftest import rows_of, tiny_config

WEIGHTS = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
LIMITS = ReplyLimits(train=train_reply_schema("fedavg", "none"), decline=None, num_clients=4,
                     train_sizes=(10, 20, 30, 40), test_sizes=(1, 2, 3, 4))


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _record(arrays):
    return ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})


GOOD_METRICS = {"num-examples": 10, "examples-seen": 40, "num-steps": 5, "duration-s": 0.5,
                "partition-id": 0, "train-loss": 0.5}


def _exchange(arrays, metrics, extra=None):
    sent = Message(RecordDict({"arrays": _record(WEIGHTS), "config": ConfigRecord()}), 1001,
                   "train")
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = _record(arrays)
    for name, record in (extra or {}).items():
        content[name] = record
    return sent, Message(content, reply_to=sent)


def _carrying(array, values):
    """``array``'s declared dtype and shape with ``values`` as its bytes."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Array(dtype=str(array.dtype), shape=array.shape, stype="numpy.ndarray",
                 data=buffer.getvalue())


def _pickled_array():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())


def _metrics(**changes):
    metrics = {**GOOD_METRICS, **changes}
    return {k: v for k, v in metrics.items() if v is not None}


@pytest.mark.parametrize("arrays, metrics, reason", [
    ({"w": WEIGHTS["w"]}, GOOD_METRICS, "tensor names differ"),
    ({**WEIGHTS, "extra": np.ones(1, np.float32)}, GOOD_METRICS, "tensor names differ"),
    ({**WEIGHTS, "b": np.zeros(3, np.float32)}, GOOD_METRICS, "arrays.b: float32[3] instead of"),
    ({**WEIGHTS, "b": np.zeros(2, np.float64)}, GOOD_METRICS, "float64[2] instead of float32[2]"),
    ({**WEIGHTS, "w": np.full((3, 2), np.nan, np.float32)}, GOOD_METRICS, "non-finite"),
    ({**WEIGHTS, "b": np.array([np.inf, 0], np.float32)}, GOOD_METRICS, "non-finite"),
    ({**WEIGHTS, "b": _pickled_array()}, GOOD_METRICS, "unreadable array"),
    # declares float32[3, 2] but carries one value (numpy would broadcast it) or seven
    ({**WEIGHTS, "w": _carrying(WEIGHTS["w"], np.array([1000.0], np.float32))}, GOOD_METRICS,
     "arrays.w: declares float32[3, 2] but carries float32[1]"),
    ({**WEIGHTS, "w": _carrying(WEIGHTS["w"], np.ones(7, np.float32))}, GOOD_METRICS,
     "declares float32[3, 2] but carries float32[7]"),
    ({**WEIGHTS, "w": _carrying(WEIGHTS["w"], np.ones((3, 2), np.float64))}, GOOD_METRICS,
     "carries float64[3, 2]"),
    ({**WEIGHTS, "w": Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray",
                            data=b"\x93NUMPY" + b"\x01\x00" + b"\x00" * 8)}, GOOD_METRICS,
     "unreadable array"),
    (WEIGHTS, _metrics(**{"num-examples": -5}), "'num-examples' = -5 is not >= 0"),
    (WEIGHTS, _metrics(**{"num-examples": 10**6}), "num-examples = 1000000, but client 0 "
                                                   "holds 10"),
    (WEIGHTS, _metrics(**{"num-examples": 2.5}), "'num-examples' = 2.5 is not an integer"),
    (WEIGHTS, _metrics(**{"num-examples": [1, 2]}), "'num-examples' = [1, 2] is not an integer"),
    (WEIGHTS, _metrics(**{"num-examples": None}), "no 'num-examples' metric"),
    (WEIGHTS, _metrics(**{"duration-s": None}), "no 'duration-s' metric"),
    (WEIGHTS, _metrics(surprise=1.0), "unexpected metric 'surprise'"),
    (WEIGHTS, _metrics(**{"train-loss": float("nan")}), "'train-loss' is not finite"),
    (WEIGHTS, _metrics(**{"partition-id": 99999}), "partition-id = 99999 is outside 0..3"),
    (WEIGHTS, _metrics(**{"partition-id": -7}), "'partition-id' = -7 is not >= 0"),
    (None, GOOD_METRICS, "no 'arrays' record"),
])
def test_bad_train_replies_are_named(arrays, metrics, reason):
    sent, reply = _exchange(arrays, metrics)
    problem = check_train_reply(sent, reply, LIMITS)
    assert problem is not None and reason in problem


def test_records_must_be_exactly_the_schemas():
    sent, reply = _exchange(WEIGHTS, GOOD_METRICS)
    assert check_train_reply(sent, reply, LIMITS) is None
    sent, renamed = _exchange(WEIGHTS, GOOD_METRICS)
    renamed.content["stats"] = renamed.content["metrics"]
    del renamed.content["metrics"]
    assert check_train_reply(sent, renamed, LIMITS) == "unexpected record 'stats' (MetricRecord)"
    _, extra = _exchange(WEIGHTS, GOOD_METRICS, {"status": ConfigRecord({"reason": ""})})
    assert "unexpected record 'status'" in check_train_reply(sent, extra, LIMITS)
    _, wrong_kind = _exchange(None, GOOD_METRICS, {"arrays": ConfigRecord({"w": 1})})
    assert check_train_reply(sent, wrong_kind, LIMITS) == ("record 'arrays' is a ConfigRecord, "
                                                           "not a ArrayRecord")


def test_identity_and_example_count_come_from_the_server():
    sent, reply = _exchange(WEIGHTS, _metrics(**{"partition-id": 1, "num-examples": 20}))
    assert check_train_reply(sent, reply, LIMITS, client_id=1) is None
    assert check_train_reply(sent, reply, LIMITS, client_id=2) == (
        "partition-id = 1, but the node that sent it is client 2")
    unknown_sizes = ReplyLimits(train=LIMITS.train, decline=None, num_clients=4,
                                max_examples=100)
    sent, reply = _exchange(WEIGHTS, _metrics(**{"num-examples": 101}))
    assert check_train_reply(sent, reply, unknown_sizes) == "num-examples = 101 is outside 1..100"


def test_sound_reply_passes_and_pickles_are_never_loaded(monkeypatch):
    sent, reply = _exchange(WEIGHTS, GOOD_METRICS)
    assert check_train_reply(sent, reply, LIMITS) is None
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    sent, reply = _exchange({**WEIGHTS, "b": _pickled_array()}, GOOD_METRICS)
    assert "unreadable" in check_train_reply(sent, reply, LIMITS)


def test_strategy_parts_of_the_schema_come_from_the_table():
    control = {k: np.zeros_like(v) for k, v in WEIGHTS.items()}
    sent = Message(RecordDict({"arrays": _record(WEIGHTS), CONTROL_KEY: _record(control),
                               "config": ConfigRecord()}), 1001, "train")
    scaffold = ReplyLimits(train=train_reply_schema("scaffold", "none"), decline=None)

    def reply(delta):
        return Message(RecordDict({"arrays": _record(WEIGHTS), CONTROL_DELTA_KEY: _record(delta),
                                   "metrics": MetricRecord(GOOD_METRICS)}), reply_to=sent)

    assert STRATEGIES["scaffold"].answers == {CONTROL_DELTA_KEY: CONTROL_KEY}
    assert check_train_reply(sent, reply(control), scaffold) is None
    wrong = {**control, "b": np.zeros(5, np.float32)}
    assert "scaffold-control-delta.b: float32[5] instead of float32[2]" in check_train_reply(
        sent, reply(wrong), scaffold)
    assert "unexpected record 'scaffold-control-delta'" in check_train_reply(
        sent, reply(control), LIMITS)  # FedAvg's schema has no such record
    plain_sent, _ = _exchange(WEIGHTS, GOOD_METRICS)  # no control was sent
    assert "'scaffold-control' was not sent" in check_train_reply(plain_sent, reply(control),
                                                                  scaffold)
    # FedNova's normaliser is required, positive and nothing else may ride along
    fednova = ReplyLimits(train=train_reply_schema("fednova", "none"), decline=None)
    assert set(STRATEGIES["fednova"].reply_metrics) == {NORMALIZER_KEY}
    sent, reply_ = _exchange(WEIGHTS, {**GOOD_METRICS, NORMALIZER_KEY: 5.0})
    assert check_train_reply(sent, reply_, fednova) is None
    sent, reply_ = _exchange(WEIGHTS, {**GOOD_METRICS, NORMALIZER_KEY: 0.0})
    assert check_train_reply(sent, reply_, fednova) == "metric 'fednova-a' = 0.0 is not > 0"
    sent, reply_ = _exchange(WEIGHTS, GOOD_METRICS)
    assert check_train_reply(sent, reply_, fednova) == "no 'fednova-a' metric"


def test_a_chunks_metrics_checked_together_get_each_records_own_answer():
    """check_metric_rows (a chunk of clients trained together) answers what
    check_metric_values answers for each record: the clean fast path, and every record it
    must send one by one (a bad value, a bool, a numpy number, an integer float64 would round,
    another key set, a FedNova normaliser the momentum does not give)."""
    plain = train_reply_schema("fedavg", "none")
    bad_values = [{"train-loss": math.nan}, {"train-loss": math.inf}, {"num-steps": -1},
                  {"num-steps": True}, {"train-loss": np.float64(0.5)}, {"num-steps": 2**60},
                  {"num-examples": 1.5}, {"duration-s": -0.1}]
    chunks = [[GOOD_METRICS] * 3,
              *[[GOOD_METRICS, {**GOOD_METRICS, **bad}, GOOD_METRICS] for bad in bad_values],
              [{**GOOD_METRICS, **bad_values[0]}, GOOD_METRICS],  # the first one is bad
              [GOOD_METRICS, {k: v for k, v in GOOD_METRICS.items() if k != "num-steps"}],
              [GOOD_METRICS, {**GOOD_METRICS, "extra": 1.0}], []]
    for records in chunks:
        assert check_metric_rows(records, plain) == [check_metric_values(r, plain)
                                                     for r in records], records
    assert check_metric_rows([GOOD_METRICS] * 2, plain) == [None, None]
    assert check_metric_rows(chunks[1], plain)[1] == "metric 'train-loss' is not finite"
    fednova = train_reply_schema("fednova", "none", {"momentum": 0.0})
    steps = GOOD_METRICS["num-steps"]
    records = [{**GOOD_METRICS, NORMALIZER_KEY: float(steps)},
               {**GOOD_METRICS, NORMALIZER_KEY: steps + 1.0}]
    answers = check_metric_rows(records, fednova)
    assert answers == [check_metric_values(r, fednova) for r in records]
    assert answers[0] is None and "fednova-a" in answers[1]


def test_a_reply_without_a_train_loss_is_sound_and_one_with_nan_is_not():
    """A client that saw no example (local DP-SGD whose every Poisson sample was empty: it
    stepped on noise alone) measured no loss and sends none: sound, alone and among a chunk's
    records. A train-loss that is there is still checked: NaN or inf is refused, so a hostile
    client gains nothing."""
    local = ReplyLimits(train=train_reply_schema("fedavg", "local"),
                        decline=decline_reply_schema("local"), train_sizes=(10,))
    dp = {"noise-multiplier": 1.1, "sample-rate": 0.1, "epsilon": 0.5}
    status = {"status": ConfigRecord({"reason": ""})}
    silent = _metrics(**{"train-loss": None, "examples-seen": 0}) | dp
    sent, reply = _exchange(WEIGHTS, silent, status)
    assert check_train_reply(sent, reply, local) is None
    sent, reply = _exchange(WEIGHTS, _metrics(**{"train-loss": None}))
    assert check_train_reply(sent, reply, LIMITS) is None
    for bad in (math.nan, math.inf):
        sent, reply = _exchange(WEIGHTS, {**silent, "train-loss": bad}, status)
        assert check_train_reply(sent, reply, local) == "metric 'train-loss' is not finite"
    records = [GOOD_METRICS | dp, silent, {**silent, "train-loss": math.nan}, GOOD_METRICS | dp]
    assert check_metric_rows(records, local.train) == [
        None, None, "metric 'train-loss' is not finite", None]
    assert check_metric_rows([silent] * 2, local.train) == [None, None]


def test_a_client_without_a_train_loss_counts_on_the_message_path(tmp_path):
    """Flower's message path: a reply without train-loss (what a client that saw no example
    sends) is accepted beside the others'; the round's train_loss is the example-weighted mean
    of those that carry one, also where each reply goes to a Flower strategy (fedmedian), which
    refuses replies whose metrics differ in keys."""
    for strategy in ("fedavg", "fedmedian"):
        run_dir, rows, metrics = _hostile_run(tmp_path / strategy, {0: hostile.NO_LOSS},
                                              f"strategy.name={strategy}")
        clients = rows_of(run_dir / "clients.csv")
        for row in metrics:
            trained = [r for r in clients if r["round"] == row["round"]]
            assert [(r["status"], bool(r["train_loss"])) for r in trained] == [
                ("ok", False), ("ok", True), ("ok", True), ("ok", True)]
            weighted = np.average([float(r["train_loss"]) for r in trained[1:]],
                                  weights=[int(r["num_examples"]) for r in trained[1:]])
            assert (row["clients_ok"], row["model_update"]) == ("4", "applied")
            assert float(row["train_loss"]) == pytest.approx(weighted, rel=1e-5)


def test_privacy_parts_of_the_schema_use_the_protocols_keys():
    local = PRIVACY_MODES["local"]
    assert set(local.reply_metrics) == {protocol.EPSILON, protocol.NOISE_MULTIPLIER,
                                        protocol.SAMPLE_RATE}
    limits = ReplyLimits(train=train_reply_schema("fedavg", "local"),
                         decline=decline_reply_schema("local"), train_sizes=(10,))
    dp = {"noise-multiplier": 1.1, "sample-rate": 0.1}
    status = {"status": ConfigRecord({"reason": ""})}
    sent, reply = _exchange(WEIGHTS, {**GOOD_METRICS, **dp, "epsilon": 0.5}, status)
    assert check_train_reply(sent, reply, limits) is None
    sent, reply = _exchange(WEIGHTS, {**GOOD_METRICS, **dp}, status)  # ε left out: no noise
    assert check_train_reply(sent, reply, limits) is None
    sent, reply = _exchange(WEIGHTS, {**GOOD_METRICS, "epsilon": 0.5}, status)
    assert check_train_reply(sent, reply, limits) == "no 'noise-multiplier' metric"
    declined = _metrics(**{"train-loss": None, "num-steps": 0}) | dp
    _, decline = _exchange(None, declined, {"status": ConfigRecord({"reason": "spent"})})
    assert check_decline(decline, limits) is None
    _, silent = _exchange(None, declined, {"status": ConfigRecord({"reason": ""})})
    assert check_decline(silent, limits) == "record 'status' gives no 'reason'"
    assert check_decline(decline, LIMITS) == ("no update (no ArrayRecord), and the privacy mode "
                                              "lets no client decline")


def test_evaluate_replies_follow_their_schema():
    sent = Message(RecordDict({"config": ConfigRecord()}), 1001, "evaluate")

    def reply(**metrics):
        values = {"eval-loss": 1.0, "eval-accuracy": 0.5, "num-examples": 1,
                  "partition-id": 0, **metrics}
        return Message(RecordDict({"metrics": MetricRecord(
            {k: v for k, v in values.items() if v is not None})}), reply_to=sent)

    assert check_evaluate_reply(reply(), LIMITS) is None
    assert check_evaluate_reply(reply(**{"eval-loss": float("inf")}), LIMITS) == (
        "metric 'eval-loss' is not finite")
    assert check_evaluate_reply(reply(**{"eval-loss": None}), LIMITS) == "no 'eval-loss' metric"
    assert check_evaluate_reply(reply(**{"eval-accuracy": 1.5}), LIMITS) == (
        "metric 'eval-accuracy' = 1.5 is not <= 1")
    assert check_evaluate_reply(reply(**{"num-examples": 3}), LIMITS) == (
        "num-examples = 3, but client 0 holds 1")


# --- attacks on a whole run: a hostile ClientApp among honest ones ------------------------------

def _hostile_run(tmp_path, attacks, *overrides, clients=4):
    config = tiny_config(tmp_path, f"data.num_clients={clients}", *overrides)
    grid = InProcessGrid(hostile.hostile_app(attacks), to_run_config(config), clients,
                         client_timeout_s=config.strategy.round_timeout_s)
    run_dir = run_federated(grid, config).path
    rows = {(int(r["round"]), int(r["client_id"]),
             *(() if r["phase"] == "train" else (r["phase"],))): (r["status"], r["reason"])
            for r in rows_of(run_dir / "clients.csv")}
    return run_dir, rows, rows_of(run_dir / "metrics.csv")


def _finite_model(run_dir):
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    return all(np.isfinite(v).all() for v in model.values())


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "krum", "fedtrimmedavg", "rfa"])
def test_payloads_that_lie_about_their_shape_are_rejected(tmp_path, strategy):
    """Declaring float32[...] but carrying one value (numpy would broadcast it over the
    tensor) or more values (a crash in the strategies): rejected, the run goes on."""
    run_dir, rows, metrics = _hostile_run(
        tmp_path, {0: hostile.BROADCAST, 1: hostile.LONGER}, f"strategy.name={strategy}")
    for server_round in (1, 2):
        assert rows[server_round, 0][0] == rows[server_round, 1][0] == "rejected"
        assert "but carries float32[1]" in rows[server_round, 0][1]
        assert "but carries float32" in rows[server_round, 1][1]
        assert rows[server_round, 2][0] == rows[server_round, 3][0] == "ok"
    assert [(m["clients_ok"], m["model_update"]) for m in metrics] == [("2", "applied")] * 2
    assert _finite_model(run_dir)


def test_replies_off_the_schema_are_rejected_not_fatal(tmp_path):
    """A missing or extra metric, a list for a number, a renamed metric record, an evaluation
    reply without its loss: round 1 no longer crashes; each is rejected with its reason (the
    evaluation in a clients.csv row of phase "evaluate")."""
    attacks = {0: hostile.EXTRA_METRIC, 1: hostile.MISSING_DURATION, 2: hostile.LIST_METRIC,
               3: hostile.RENAMED_RECORD, 4: hostile.EVAL_NO_LOSS}
    run_dir, rows, metrics = _hostile_run(tmp_path, attacks, clients=6)
    reasons = {client: rows[1, client] for client in range(6)}
    assert reasons[0] == ("rejected", "unexpected metric 'surprise'")
    assert reasons[1] == ("rejected", "no 'duration-s' metric")
    assert reasons[2] == ("rejected", "metric 'num-examples' = [1, 2] is not an integer")
    assert reasons[3] == ("rejected", "unexpected record 'stats' (MetricRecord)")
    assert reasons[4] == reasons[5] == ("ok", "")  # client 4 lies only when evaluating
    assert {key: row for key, row in rows.items() if len(key) == 3} == {
        (r, 4, "evaluate"): ("rejected", "no 'eval-loss' metric") for r in (1, 2)}
    assert [m["clients_ok"] for m in metrics] == ["2", "2"]
    # the evaluation without a loss is left out of the federated mean, not averaged as 0
    assert all(float(m["federated_eval_loss"]) > 0 for m in metrics)
    assert _finite_model(run_dir)


def test_identity_comes_from_the_node_not_the_reply(tmp_path):
    """Claiming another client's partition id, ids 99999 and -7, the federation's whole example
    count: each is rejected and recorded under the sender's real client id."""
    attacks = {1: hostile.IMPERSONATE, 2: hostile.HUGE_ID, 3: hostile.NEGATIVE_ID,
               4: hostile.INFLATE}
    run_dir, rows, metrics = _hostile_run(tmp_path, attacks, clients=6)
    assert sorted(client for server_round, client in rows if server_round == 1) == list(range(6))
    assert rows[1, 1] == ("rejected", "partition-id = 0, but the node that sent it is client 1")
    assert rows[1, 2] == ("rejected", "partition-id = 99999 is outside 0..5")
    assert rows[1, 3] == ("rejected", "metric 'partition-id' = -7 is not >= 0")
    assert rows[1, 4][0] == "rejected" and rows[1, 4][1].startswith("num-examples = 1000000, but "
                                                                    "client 4 holds ")
    assert rows[1, 0] == rows[1, 5] == ("ok", "")
    assert [m["clients_ok"] for m in metrics] == ["2", "2"]


def test_a_fake_budget_spent_reply_does_not_stop_a_run_without_privacy(tmp_path):
    run_dir, rows, metrics = _hostile_run(tmp_path, dict.fromkeys(range(4), hostile.DECLINE),
                                          "run.rounds=3", "run.max_rounds_without_update=5")
    assert {rows[r, c] for r in (1, 2, 3) for c in range(4)} == {
        ("rejected", "no update (no ArrayRecord), and the privacy mode lets no client decline")}
    assert len(metrics) == 3  # every round ran: the lie stopped nothing
    summary = (run_dir / "summary.json").read_text()
    assert '"stop_reason": ""' in summary or '"stop_reason": null' in summary


def test_replies_to_an_old_message_are_dropped_and_counted(tmp_path):
    """From round 2 on client 1 answers its round-1 message: the reply is dropped and
    counted, the client is recorded as failed, the round goes on at once."""
    run_dir, rows, metrics = _hostile_run(tmp_path, {1: hostile.STALE}, "run.rounds=3")
    assert rows[1, 1] == ("ok", "")
    for server_round in (2, 3):
        assert rows[server_round, 1] == (
            "failed", "RuntimeError: the ClientApp's reply answered another message")
    assert [int(m["replies_dropped"]) for m in metrics] == [0, 1, 1]
    assert [m["clients_ok"] for m in metrics] == ["4", "3", "3"]


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
    assert _finite_model(run_dir)


def test_rounds_without_sound_updates_stop_the_run_with_reasons(tmp_path):
    config = tiny_config(tmp_path, "run.rounds=5", "run.max_rounds_without_update=2")
    grid = InProcessGrid(poisoning_client_app({0, 1, 2, 3}), to_run_config(config), 4)
    with pytest.raises(RuntimeError, match="2 rounds in a row without an update of the global "
                                           "model.*kept: 0 sound updates of 4.*non-finite"):
        run_federated(grid, config)
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [(m["clients_ok"], m["model_update"]) for m in metrics] == [
        ("0", "kept: 0 sound updates of 4")]  # round 1 kept, nothing lost


@pytest.mark.slow
def test_the_ray_engine_never_aggregates_a_lying_payload(tmp_path):
    """A ClientApp on Ray actors whose tensor declares one shape and carries another: the
    server screens the reply by what it carries and rejects it; the others are aggregated."""
    from fedtune.engine.ray_engine import ray_engine_grid

    config = tiny_config(tmp_path, "engine.backend=ray", "engine.num_actors=2",
                         "engine.client_cpus=0.5")
    with ray_engine_grid(config, hostile.hostile_app({0: hostile.BROADCAST})) as grid:
        run_dir = run_federated(grid, config).path
    rows = {(int(r["round"]), int(r["client_id"])): (r["status"], r["reason"])
            for r in rows_of(run_dir / "clients.csv")}
    for server_round in (1, 2):
        assert rows[server_round, 0][0] == "rejected"
        assert "but carries float32[1]" in rows[server_round, 0][1]
        assert {rows[server_round, c] for c in (1, 2, 3)} == {("ok", "")}
    assert [m["model_update"] for m in rows_of(run_dir / "metrics.csv")] == ["applied"] * 2
    assert _finite_model(run_dir)


def test_losses_beyond_any_training_are_rejected_and_metrics_stay_finite(tmp_path):
    """A train loss of +-1.7e308 and an evaluation loss of 1.7e308 (finite, so once accepted,
    their example-weighted means overflowed and metrics.csv read inf): each is rejected with
    the bound it breaks, the evaluation in a row of phase "evaluate", and every number in
    metrics.csv is finite."""
    attacks = {0: hostile.HUGE_LOSS, 1: hostile.NEGATIVE_LOSS, 2: hostile.EVAL_HUGE_LOSS}
    run_dir, rows, metrics = _hostile_run(tmp_path, attacks, clients=4)
    for server_round in (1, 2):
        assert rows[server_round, 0] == ("rejected", "metric 'train-loss' = 1.7e+308 is not "
                                                     "<= 1e+12")
        assert rows[server_round, 1] == ("rejected", "metric 'train-loss' = -1.7e+308 is not "
                                                     ">= -1e+12")
        assert rows[server_round, 2] == rows[server_round, 3] == ("ok", "")
        assert rows[server_round, 2, "evaluate"] == ("rejected", "metric 'eval-loss' = "
                                                                 "1.7e+308 is not <= 1e+12")
    for row in metrics:
        numbers = [float(v) for k, v in row.items() if v and k != "model_update"]
        assert all(math.isfinite(v) for v in numbers), row
    assert _finite_model(run_dir)


def test_an_absurd_fednova_a_is_rejected_and_its_sender_named(tmp_path):
    """FedNova's ``fednova-a`` of 1e300 or 1e-300 (finite, > 0) made every aggregate
    non-finite while its sender stayed ``ok``; 10^15 claimed steps with the matching
    ``fednova-a`` would multiply the global step. Each is rejected under its sender's id,
    the others are aggregated every round."""
    attacks = {0: hostile.FEDNOVA_HUGE, 1: hostile.FEDNOVA_TINY, 2: hostile.FEDNOVA_STEPS}
    run_dir, rows, metrics = _hostile_run(
        tmp_path, attacks, "strategy.name=fednova", "client.optimizer=sgd",
        "client.momentum=0.5", clients=5)
    for server_round in (1, 2):
        for client in (0, 1):
            status, reason = rows[server_round, client]
            assert status == "rejected"
            assert reason.startswith("metric 'fednova-a' = 1e") and "5 steps" in reason
        assert rows[server_round, 2] == (
            "rejected", "num-steps = 1000000000000000, but client 2 takes at most 5 steps")
        assert rows[server_round, 3] == rows[server_round, 4] == ("ok", "")
    assert [(m["clients_ok"], m["model_update"]) for m in metrics] == [("2", "applied")] * 2
    assert _finite_model(run_dir)


SMUGGLED = ("arrays.{} is part of the client's personal part, which must be sent back as "
            "received, but it differs")


@pytest.mark.parametrize("strategy", ["fedper", "ditto"])
def test_a_reply_that_smuggles_a_personal_part_is_rejected(tmp_path, strategy):
    """FedPer's clients keep their heads: a reply whose classifier differs from the one sent
    releases (or injects) a personal part and is rejected with that reason, in the message
    path and in the cohort engine's; Ditto keeps a whole personal model beside the global one
    it shares, so the same reply is an ordinary update there."""
    _, rows, metrics = _hostile_run(tmp_path, {0: hostile.SMUGGLE_HEAD},
                                    f"strategy.name={strategy}")
    if strategy == "ditto":
        assert rows[1, 0] == ("ok", "")
        return
    for server_round in (1, 2):
        assert rows[server_round, 0] == ("rejected", SMUGGLED.format("classifier.bias"))
        assert rows[server_round, 1] == ("ok", "")
    assert [m["clients_ok"] for m in metrics] == ["3", "3"]


def test_the_cohort_engine_rejects_an_update_attack_on_a_personal_part(tmp_path):
    """Gaussian noise on every coordinate of FedPer's update changes the head the client must
    send back as received: screened where the clients ran (fedtune.engine.cohort), rejected
    with the same reason; the honest clients' bodies are aggregated."""
    from fedtune.engine.inprocess import run_inprocess

    run_dir = run_inprocess(tiny_config(tmp_path, "strategy.name=fedper", "attack.name=gaussian",
                                        "attack.clients=[1]")).path
    rows = [(r["client_id"], r["status"], r["reason"]) for r in rows_of(run_dir / "clients.csv")]
    smuggled = ("1", "rejected", SMUGGLED.format("classifier.weight"))
    assert [r for r in rows if r[0] == "1"] == [smuggled] * 2
    assert all(status == "ok" for client, status, _ in rows if client != "1")
