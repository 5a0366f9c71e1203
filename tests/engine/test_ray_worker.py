"""The fast engine's actor class without Ray: a client's Context.state travels with its tasks,
so any actor can serve the client next and continue where the last one stopped."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.engine.inprocess import act_as_server
from fedtune.engine.ray_worker import ClientTask, ClientWorker

counting_app = ClientApp()


@counting_app.train()
def count_calls(msg: Message, context: Context) -> Message:
    if msg.content["config"]["fail"]:
        raise RuntimeError("failing on purpose")
    calls = int(context.state["calls"]["count"]) + 1 if "calls" in context.state else 1
    context.state["calls"] = MetricRecord({"count": calls})
    return Message(RecordDict({"metrics": MetricRecord({"calls": calls})}), reply_to=msg)


def _task(state: bytes | None, fail: bool = False) -> ClientTask:
    act_as_server(1)
    message = Message(RecordDict({"config": ConfigRecord({"fail": fail})}), 1007, "train")
    return ClientTask(metadata=message.metadata, content=message.content, arrays={},
                      order=("config",), node_config={"partition-id": 7, "num-partitions": 8},
                      state=state)


def test_state_follows_the_client_from_actor_to_actor():
    actors = [ClientWorker(counting_app, {}, 1, 1.0) for _ in range(2)]
    state = None
    for call in range(1, 6):  # alternate actors, as the grid may after a restart or by load
        (outcome,) = actors[call % 2].serve([_task(state)])
        assert outcome.reply.content["metrics"]["calls"] == call
        state = outcome.state
    # a failed call returns no state: the driver keeps the one from before
    (failed,) = actors[0].serve([_task(state, fail=True)])
    assert failed.reply.has_error() and failed.state is None
    (outcome,) = actors[1].serve([_task(state)])
    assert outcome.reply.content["metrics"]["calls"] == 6
