"""A ClientApp for engine tests: fedtune's own, with faults for chosen clients.

Client RAISES raises in every round; in round 1 client DIES kills its actor's process and
client STALLS sleeps far past any test's engine.client_timeout_s. Every training that gets to
fedtune's ClientApp counts itself in the client's Context.state, so a test can see that state
lives across rounds and across actors. No part of fedtune is replaced.
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedtune.client.app import app as fedtune_app

RAISES, DIES, STALLS = 1, 2, 3
STALL_S = 600
COUNTER = "test-trainings"

app = ClientApp()


def trainings(context: Context) -> int:
    record = context.state.get(COUNTER)
    return int(record["count"]) if record is not None else 0


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = int(context.node_config["partition-id"])
    first_round = int(msg.content["config"]["server-round"]) == 1
    if client == RAISES:
        raise RuntimeError(f"client {client} fails on purpose")
    if client == DIES and first_round:
        os._exit(3)
    if client == STALLS and first_round:
        time.sleep(STALL_S)
    reply = fedtune_app(msg, context)
    context.state[COUNTER] = MetricRecord({"count": trainings(context) + 1})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedtune_app(msg, context)
