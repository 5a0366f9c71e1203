"""The model guard: update-norm bounds, and a global model that is never non-finite."""

from __future__ import annotations

import json
import re

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
from fedtune.server.phases import TrainPhase
from fedtune.server.reports import ClientReport
from fedtune.server.round import aggregate_checked
from tests.conftest import rows_of, tiny_config

GLOBAL = {"w": np.zeros(4, np.float32), "steps": np.array([3], np.int64)}


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _sent():
    return Message(RecordDict({"config": ConfigRecord()}), 1001, "train")


def _reply(w, client=0, sent=None):
    arrays = ArrayRecord({"w": Array(np.asarray(w, np.float32)), "steps": Array(GLOBAL["steps"])})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 10, "partition-id": client})}), reply_to=sent or _sent())


def _report(reply, client=0):
    """An accepted client's report, as the message path screens it (the reply as it came)."""
    return ClientReport(1001, client, "ok", metrics=dict(reply.content["metrics"]), reply=reply)


def _train(replies):
    return TrainPhase([_sent()], [_report(r, c) for c, r in enumerate(replies)], None, 0, 0)


def test_updates_are_clipped_to_the_bound_and_outliers_rejected_by_robust_z():
    honest = [_report(_reply(np.full(4, 0.5 + 0.01 * i))) for i in range(6)]  # norms 1.0 .. 1.1
    boosted = _report(_reply(np.full(4, -50.0)))  # norm 100
    bound_updates(GLOBAL, [*honest, boosted], max_norm=0.0, z_limit=3.0)
    assert [r.status for r in honest] == ["ok"] * 6 and boosted.status == "rejected"
    assert "update norm 100 is an outlier: robust z-score" in boosted.reason
    assert "> strategy.update_norm_z = 3" in boosted.reason
    assert boosted.reply is None and boosted.update is None  # nothing of it can be aggregated
    reports = [*[_report(r.reply) for r in honest], _report(_reply(np.full(4, -50.0)))]
    bound_updates(GLOBAL, reports, 0.5, 0.0)
    assert [r.status for r in reports] == ["ok"] * 7
    for report in reports:  # every update (all above 0.5) now has norm 0.5, direction kept
        assert report.reply is None  # the strategy gets the clipped update, not the reply
        arrays = report.update["arrays"]
        assert update_norm(GLOBAL, arrays) == pytest.approx(0.5, rel=1e-6)
        np.testing.assert_array_equal(arrays["steps"], [3])
    assert reports[-1].update["arrays"]["w"][0] == pytest.approx(-0.25)
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
        kept, _, problem = aggregate_checked(Overshooting(), 1, _train(replies), previous)
    assert kept is previous and problem == "the aggregate is not finite (in w)"


def test_a_failing_strategy_fails_the_round_not_the_run():
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise ValueError("bad input")

    previous = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    kept, _, problem = aggregate_checked(Broken(), 1, _train([_reply(np.ones(4))]), previous)
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


# --- absurd updates and aggregates (issue 25.4) -------------------------------------------------

def _federated_run(tmp_path, *overrides, strategy=None):
    """A run of the tiny MLP on digits, set up as ``run_federated`` sets it up (in process)."""
    from fedtune.client.app import app as fedtune_client_app
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.models.build import build_model
    from fedtune.models.weights import shared_state
    from fedtune.protocol import to_array_record
    from fedtune.server.build_strategy import build_strategy
    from fedtune.server.identity import Identities
    from fedtune.server.round import FederatedRun
    from fedtune.server.state import RoundState
    from fedtune.tables.privacy_modes import privacy_mode
    from fedtune.task import task_resources

    config = tiny_config(tmp_path, *overrides)
    grid = InProcessGrid(fedtune_client_app, to_run_config(config), config.data.num_clients)
    resources = task_resources(config)
    mode = privacy_mode(config)
    plan = mode.plan(config)
    arrays = to_array_record(shared_state(build_model(resources.spec, config.run.seed)))
    return FederatedRun(config, grid, resources, strategy or build_strategy(config, plan),
                        mode.server(config, plan), RoundState(arrays),
                        lambda *progress: None, identities=Identities(grid.node_to_client, True))


def _overflowing(arrays):
    """Finite float32 weights whose logits overflow: the loss on any input is NaN."""
    model = {name: array.numpy().copy() for name, array in arrays.items()}
    model["body.0.weight"] *= np.float32(1e30)
    model["classifier.weight"] *= np.float32(1e30)
    return ArrayRecord({name: Array(value) for name, value in model.items()})


@pytest.mark.parametrize("transport", ["messages", "cohort"])
def test_a_huge_finite_update_names_its_sender_and_the_others_train_on(tmp_path, transport):
    """Client 0 sends 3e38 in every weight (finite, well formed) each round, under plain
    FedAvg. Before the guard bounded it, round 1 applied it and from round 2 on every honest
    client was rejected for a non-finite train loss while client 0 stayed ok. Now client 0 is
    rejected every round with the reason, the honest clients' updates are applied, and the
    model learns."""
    from fedtune.client.app import app as fedtune_client_app
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated
    from tests import faulty_client
    from tests import hostile_client as hostile

    config = tiny_config(tmp_path, "run.rounds=3")
    if transport == "messages":
        grid = InProcessGrid(hostile.hostile_app({0: hostile.HUGE}), to_run_config(config), 4)
    else:
        grid = InProcessGrid(fedtune_client_app, to_run_config(config), 4,
                             train=faulty_client.huge_update_train)
    assert grid.runs_cohorts == (transport == "cohort")
    run_dir = run_federated(grid, config).path
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    for server_round in (1, 2, 3):
        attacker = rows[server_round, 0]
        assert attacker["status"] == "rejected"
        assert attacker["reason"].startswith("update norm ")
        assert "is absurd: more than 1e+06 x max(the global model's norm" in attacker["reason"]
        assert [rows[server_round, c]["status"] for c in (1, 2, 3)] == ["ok"] * 3
    metrics = rows_of(run_dir / "metrics.csv")
    assert [m["model_update"] for m in metrics] == ["applied"] * 3
    assert float(metrics[-1]["eval_accuracy"]) > 0.5
    assert _finite_model_file(run_dir)


def _finite_model_file(run_dir):
    model = load_file(str(run_dir / "model" / "model.safetensors"))
    return all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in model.values())


def test_an_absurd_server_step_is_refused_and_the_strategy_put_back(tmp_path):
    """FedAvgM with server_lr = 1e30 (its aggregate is finite: about 1e28): the guard refuses
    it as absurd next to the clients' updates, the global model stays, and FedAvgM's momentum
    and current model are what they were before it aggregated."""
    run = _federated_run(tmp_path, "strategy.name=fedavgm", "strategy.server_lr=1e30")
    from fedtune.server.round import play_round

    before = {name: array.numpy().copy() for name, array in run.state.arrays.items()}
    outcome = play_round(run, 1)
    assert re.fullmatch(r"kept: the aggregate moves the model by [0-9.]+e\+30, more than "
                        r"1e\+06 x max\(the largest client update [0-9.]+, the model's norm "
                        r"[0-9.]+, 1\)", outcome.row.model_update)
    assert outcome.clients and {row.status for row in outcome.clients} == {"ok"}
    assert all(np.array_equal(run.state.arrays[n].numpy(), v) for n, v in before.items())
    strategy = run.strategy
    assert strategy.momentum_vector is None  # put back: no step was taken
    assert all(np.array_equal(strategy.current_arrays[n].numpy(), v) for n, v in before.items())
    assert run.state.rounds_without_update == 1 and np.isfinite(outcome.evaluation.loss)


def test_fedavgm_with_an_absurd_server_rate_fails_the_run_instead_of_finishing(tmp_path):
    """Before: 3 rounds "finished" with weights around 1e28 and a NaN loss. Now each round keeps
    the model and the run fails after run.max_rounds_without_update rounds, saying why."""
    config = tiny_config(tmp_path, "strategy.name=fedavgm", "strategy.server_lr=1e30",
                         "run.rounds=3")
    with pytest.raises(RunFailed, match="3 rounds in a row without an update of the global "
                                        "model .*kept: the aggregate moves the model by"):
        run_inprocess(config)
    metrics = rows_of(tmp_path / "run" / "metrics.csv")
    assert all(m["model_update"].startswith("kept: the aggregate moves") for m in metrics)
    assert all(np.isfinite(float(m["eval_loss"])) for m in metrics)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_model_whose_test_loss_is_not_finite_is_refused(tmp_path):
    """A strategy returns finite weights whose logits overflow (NaN loss on the global test
    set); even with a client update large enough that the step is not absurd next to it, the
    round keeps the model and the strategy's state is put back."""
    from fedtune.server.round import update_global_model

    class Overflowing(FedAvg):
        aggregated = 0

        def aggregate_train(self, server_round, replies):
            self.aggregated += 1
            return _overflowing(self.model), None

    strategy = Overflowing()  # its replies as they come: a strategy that does not sum
    run = _federated_run(tmp_path, "strategy.name=fedmedian", strategy=strategy)
    strategy.model = run.state.arrays
    sent = _sent()
    report = ClientReport(1000, 0, "ok", metrics={"num-examples": 10}, update_norm=1e40,
                          reply=_reply(np.zeros(4), sent=sent))
    train = TrainPhase([sent], [report], None, 0, 0)
    previous = run.state.arrays
    metrics, model_update, evaluation = update_global_model(run, 1, train)
    assert model_update == "kept: the new model's loss on the global test set is nan"
    assert run.state.arrays is previous and np.isfinite(evaluation.loss)
    assert strategy.aggregated == 0 and run.state.rounds_without_update == 1


def test_a_final_model_whose_test_loss_is_not_finite_fails_the_run(tmp_path):
    """A run resumed after its last round from a checkpoint whose model gives a NaN loss (one
    older code kept): it fails instead of ending "finished", and the listeners hear of it."""
    from fedtune.server.loop import RunListener, run_rounds

    run = _federated_run(tmp_path)
    run.state.arrays = _overflowing(run.state.arrays)
    run.state.server_round = run.config.run.rounds

    class Aborted(RunListener):
        error = None

        def run_aborted(self, run, error):
            self.error = error

    listener = Aborted()
    with pytest.raises(RunFailed, match="the final global model's loss on the global test set "
                                        "is nan"):
        run_rounds(run, [listener])
    assert isinstance(listener.error, RunFailed)
