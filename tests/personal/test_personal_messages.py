"""Where the clients keep their own state (Flower's simulation, a deployment's SuperNodes) each
client evaluates its own models and replies metrics only: the same personal.csv as the driver's
evaluation over the runtime's state store, bit for bit; replies off their schema are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedtune import protocol
from fedtune.engine.inprocess import run_inprocess
from fedtune.server.app import run_federated
from fedtune.server.screening import ReplyLimits, check_personal_reply
from tests.client.test_node_state import deployment_grid
from tests.conftest import rows_of, tiny_config

# half the clients train each round; every client is evaluated every round, local-only at the end
EVERY_CLIENT = ["strategy.fraction_train=0.5", "run.personal_eval_every=1",
                "run.local_reference=true", "data.local_val_fraction=0.2"]


@pytest.mark.parametrize("strategy", ["fedper", "fedbabu"])
def test_clients_that_keep_their_state_evaluate_to_the_driver_s_personal_csv(tmp_path, strategy,
                                                                           one_torch_thread):
    """FedPer's heads live in each node's Context; FedBABU fine-tunes at evaluation with model
    selection on the validation split: by messages, every client's rows equal the in-process
    runtime's (its states in the driver's store)."""
    store = tiny_config(tmp_path / "store", f"strategy.name={strategy}", *EVERY_CLIENT)
    nodes = tiny_config(tmp_path / "nodes", f"strategy.name={strategy}", *EVERY_CLIENT)
    by_store = run_inprocess(store).path
    by_messages = run_federated(deployment_grid(nodes, None), nodes).path
    ours, theirs = (rows_of(run / "personal.csv") for run in (by_messages, by_store))
    assert len(ours) == 2 * 4 * 2 + 4 and ours == theirs
    assert {r["model"] for r in ours} == {"global", "personalised", "local_only"}
    summaries = [json.loads((run / "summary.json").read_text())["personal"]
                 for run in (by_messages, by_store)]
    assert summaries[0] == summaries[1] and summaries[0]["models"]["personalised"]["clients"] == 4


def test_fedper_heads_outlive_a_resumed_deployment_with_a_state_dir(tmp_path, one_torch_thread):
    """A server that stops after round 1 and resumes in a new Flower run (every Context empty):
    the nodes' state-dir gives each client its head back, so the personalised rows of round 2
    are the uninterrupted run's; without a state-dir the heads are lost and they differ."""
    over = ["strategy.name=fedper", "run.personal_eval_every=1"]
    reference = tiny_config(tmp_path / "a", *over)
    run_federated(deployment_grid(reference, tmp_path / "nodes-a"), reference)
    want = rows_of(tmp_path / "a" / "run" / "personal.csv")
    for state_dir in (True, False):
        config = tiny_config(tmp_path / f"b{state_dir}", "run.rounds=1", *over)
        nodes = tmp_path / f"nodes-b{state_dir}" if state_dir else None
        run_federated(deployment_grid(config, nodes), config)
        config.run.rounds, config.run.resume = 2, True
        got = rows_of(run_federated(deployment_grid(config, nodes), config).path /
                      "personal.csv")
        personal = [(r, w) for r, w in zip(got, want, strict=True)
                    if r["model"] == "personalised" and r["round"] == "2"]
        assert (got == want) == state_dir
        assert all(r == w for r, w in personal) == state_dir


LIMITS = ReplyLimits(train=protocol.EVALUATE_REPLY_SCHEMA, decline=None, num_clients=4,
                     test_sizes=[5, 0, 5, 5])
SCHEMA = protocol.personal_reply_schema(personalised=True, local_only=False)


def _reply(**metrics) -> Message:
    values = {"partition-id": 0, "global-examples": 5, "global-accuracy": 0.6,
              "global-loss": 1.1, "personalised-examples": 5, "personalised-accuracy": 0.8,
              "personalised-loss": 0.7}
    values.update(metrics)
    values = {k: v for k, v in values.items() if v is not None}
    message = Message(RecordDict({"metrics": MetricRecord(values)}), dst_node_id=1,
                      message_type=protocol.PERSONAL_MESSAGE_TYPE)
    return Message(message.content, reply_to=message)


@pytest.mark.parametrize(("metrics", "client", "reason"), [
    ({}, 0, None),
    ({"local-only-accuracy": 1.0}, 0, "unexpected metric 'local-only-accuracy'"),
    ({"personalised-accuracy": 1.5}, 0, "metric 'personalised-accuracy' = 1.5 is not <= 1"),
    ({"personalised-accuracy": np.nan}, 0, "metric 'personalised-accuracy' is not finite"),
    ({"global-examples": 500}, 0, "global-examples = 500, but client 0 holds 5"),
    ({}, 2, "partition-id = 0, but the node that sent it is client 2"),
    ({"partition-id": 7}, None, "partition-id = 7 is outside 0..3"),
    ({"personalised-loss": None}, 0,
     "personalised-accuracy and -loss must be given exactly when personalised-examples > 0"),
    ({"partition-id": 1, "global-examples": 0, "personalised-examples": 0}, 1,
     "global-accuracy and -loss must be given exactly when global-examples > 0"),
    ({"partition-id": 1, "global-examples": 0, "personalised-examples": 0,
      "global-accuracy": None, "global-loss": None, "personalised-accuracy": None,
      "personalised-loss": None}, 1, None),
])
def test_personal_replies_follow_their_schema(metrics, client, reason):
    assert check_personal_reply(_reply(**metrics), SCHEMA, LIMITS, client) == reason


def test_a_personal_reply_carries_metrics_only():
    reply = _reply()
    reply.content["arrays"] = protocol.to_array_record({"head": np.zeros(2, np.float32)})
    assert check_personal_reply(reply, SCHEMA, LIMITS, 0) == \
        "unexpected record 'arrays' (ArrayRecord)"
