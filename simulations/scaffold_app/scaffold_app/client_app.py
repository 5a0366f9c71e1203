"""ClientApp: SCAFFOLD's client side (Karimireddy et al. 2020, Algorithm 1, option II).

The client control variate ``c_i`` lives in the Flower ``Context.state``, so it survives from
one round to the next in every Flower runtime.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from scaffold_app.task import accuracy, client_data, loss_and_gradient
from strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY, client_control_update

STATE_KEY = "client-control"

app = ClientApp()


def _numpy(record: ArrayRecord) -> dict:
    return {name: array.numpy() for name, array in record.items()}


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    features, labels = client_data(int(context.node_config["partition-id"]))
    steps, lr = int(context.run_config["local-steps"]), float(context.run_config["lr"])
    x = _numpy(msg.content["arrays"])
    c = _numpy(msg.content[CONTROL_KEY])
    c_i = (_numpy(context.state[STATE_KEY]) if STATE_KEY in context.state
           else {name: np.zeros_like(value) for name, value in c.items()})
    y = dict(x)
    for _ in range(steps):  # corrected gradient steps: y <- y - lr (g(y) - c_i + c)
        loss, gradient = loss_and_gradient(y, features, labels)
        y = {name: y[name] - lr * (gradient[name] - c_i[name] + c[name]) for name in y}
    new_c_i, delta = client_control_update(c_i, c, x, y, steps, lr)
    context.state[STATE_KEY] = _record(new_c_i)
    metrics = MetricRecord({"num-examples": len(labels), "train-loss": loss})
    content = RecordDict({"arrays": _record(y), CONTROL_DELTA_KEY: _record(delta),
                          "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    features, labels = client_data(int(context.node_config["partition-id"]))
    model = _numpy(msg.content["arrays"])
    metrics = MetricRecord({"num-examples": len(labels),
                            "accuracy": accuracy(model, features, labels)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
