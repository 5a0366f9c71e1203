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


def faulty_train(resources, client_id: int, server_round: int, content, global_arrays, state):
    """The same faults in the engine's cohort path: wraps fedtune's ``train_client``."""
    from fedtune.client.app import train_client

    if client_id == RAISES:
        raise RuntimeError(f"client {client_id} fails on purpose")
    if client_id == DIES and server_round == 1:
        os._exit(3)
    if client_id == STALLS and server_round == 1:
        time.sleep(STALL_S)
    trained = train_client(resources, client_id, server_round, content, global_arrays, state)
    count = int(state[COUNTER]["count"]) if COUNTER in state else 0
    state[COUNTER] = MetricRecord({"count": count + 1})
    return trained


def in_process_faults(resources, client_id: int, server_round: int, content, global_arrays,
                      state):
    """What ``faulty_train`` does, for a process that cannot lose a worker: the same clients
    fail in the same rounds (they raise instead of dying or stalling)."""
    from fedtune.client.app import train_client

    if client_id == RAISES or (client_id in (DIES, STALLS) and server_round == 1):
        raise RuntimeError(f"client {client_id} fails on purpose")
    return train_client(resources, client_id, server_round, content, global_arrays, state)


HUGE = 3e38  # finite in float32; a mean with it is finite, the next training is not
ATTACKER = 0


def huge_update_train(resources, client_id: int, server_round: int, content, global_arrays,
                      state):
    """fedtune's ``train_client``, except that client ATTACKER sends HUGE in every floating
    tensor of its model (well formed, finite, its metrics honest): the cohort path's attack."""
    import numpy as np

    from fedtune.client.app import train_client

    trained = train_client(resources, client_id, server_round, content, global_arrays, state)
    if client_id == ATTACKER and trained.arrays is not None:
        trained.arrays = {name: np.full_like(value, HUGE) if value.dtype.kind == "f" else value
                          for name, value in trained.arrays.items()}
    return trained
