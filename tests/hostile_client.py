"""A hostile ClientApp for the attack tests: fedtune's own, whose reply chosen clients tamper with.

``hostile_app({client: attack})`` trains and evaluates honestly (fedtune's ClientApp) and then
changes the reply of each listed client as its attack says - what a client that runs its own
code can send. It lives in a module of its own so Ray actors can import it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import app as fedtune_client
from strategies.fednova import local_normalizer

# train-reply attacks
BROADCAST = "broadcast"  # first tensor declares its shape but carries one value, 1000.0
LONGER = "longer"  # first tensor declares its shape but carries more values
EXTRA_METRIC = "extra-metric"
MISSING_DURATION = "missing-duration"
LIST_METRIC = "list-metric"  # num-examples as a list
RENAMED_RECORD = "renamed-record"  # the MetricRecord under another name
IMPERSONATE = "impersonate"  # claims partition-id 0
HUGE_ID = "id-99999"
NEGATIVE_ID = "id-minus-7"
INFLATE = "inflate"  # claims the federation's whole example count
DECLINE = "decline"  # "my privacy budget is spent" without training
STALE = "stale"  # from round 2 on, answers its message of round 1
SCALE = "scale"  # a finite update scaled by 1e6
HUGE = "huge"  # 3e38 in every floating tensor: finite, well formed
HUGE_LOSS = "huge-loss"  # train-loss = 1.7e308
NEGATIVE_LOSS = "negative-loss"  # train-loss = -1.7e308
NO_LOSS = "no-loss"  # no train-loss: not an attack, what a client that saw no example sends
LONG_NAME = "long-name"  # a metric named by 300,000 characters
HUGE_DECLINE = "huge-decline"  # "budget spent" with a 1 MB reason
ESCAPES = "escapes"  # raises an error whose text holds ANSI escapes and newlines
FEDNOVA_HUGE = "fednova-huge"  # fednova-a = 1e300
FEDNOVA_TINY = "fednova-tiny"  # fednova-a = 1e-300
FEDNOVA_STEPS = "fednova-steps"  # claims 10^15 steps, with the fednova-a they give (momentum 0.5)
SMUGGLE_HEAD = "smuggle-head"  # its last tensor (the MLP's classifier bias) + 0.5: a trained head
ESCAPE_TEXT = "\x1b[2J\x1b[31mpwned\nfedtune: round 9 finished\r\x07"
# evaluate-reply attacks
EVAL_NO_LOSS = "eval-no-loss"
EVAL_HUGE_LOSS = "eval-huge-loss"  # eval-loss = 1.7e308
EVALUATE_ATTACKS = (EVAL_NO_LOSS, EVAL_HUGE_LOSS)


def _carrying(array: Array, values: np.ndarray) -> Array:
    """``array``'s declared dtype and shape, with ``values`` as its bytes."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                 data=buffer.getvalue())


def _tamper_arrays(reply: Message, change) -> None:
    arrays: ArrayRecord = reply.content["arrays"]
    name = next(iter(arrays.keys()))
    arrays[name] = change(arrays[name])


def tamper(attack: str, msg: Message, reply: Message,
           first_messages: dict[int, Message]) -> Message:
    """The reply a client running ``attack`` sends instead of its honest ``reply``
    (``first_messages``: each client's first train message, for STALE)."""
    metrics: MetricRecord = reply.content["metrics"]
    if attack == BROADCAST:
        _tamper_arrays(reply, lambda a: _carrying(a, np.array([1000.0], dtype=a.dtype)))
    elif attack == LONGER:
        _tamper_arrays(reply, lambda a: _carrying(
            a, np.ones(int(np.prod(a.shape)) + 5, dtype=a.dtype)))
    elif attack == EXTRA_METRIC:
        metrics["surprise"] = 1.0
    elif attack == MISSING_DURATION:
        del metrics["duration-s"]
    elif attack == LIST_METRIC:
        metrics["num-examples"] = [1, 2]
    elif attack == RENAMED_RECORD:
        del reply.content["metrics"]
        reply.content["stats"] = metrics
    elif attack == IMPERSONATE:
        metrics["partition-id"] = 0
    elif attack == HUGE_ID:
        metrics["partition-id"] = 99999
    elif attack == NEGATIVE_ID:
        metrics["partition-id"] = -7
    elif attack == INFLATE:
        metrics["num-examples"] = 10**6
    elif attack in (DECLINE, HUGE_DECLINE):
        del reply.content["arrays"]
        del metrics["train-loss"]
        reason = "privacy budget: spent (a lie)" if attack == DECLINE else "spent " * 2**18
        reply.content["status"] = ConfigRecord({"reason": reason})
    elif attack == LONG_NAME:
        metrics["m" * 300_000] = 1.0
    elif attack == ESCAPES:
        raise RuntimeError(ESCAPE_TEXT)
    elif attack in (FEDNOVA_HUGE, FEDNOVA_TINY):
        metrics["fednova-a"] = 1e300 if attack == FEDNOVA_HUGE else 1e-300
    elif attack == FEDNOVA_STEPS:
        metrics["num-steps"], metrics["fednova-a"] = 10**15, local_normalizer(10**15, 0.5)
    elif attack == SMUGGLE_HEAD:
        arrays = reply.content["arrays"]
        name = list(arrays.keys())[-1]
        arrays[name] = Array(arrays[name].numpy() + np.float32(0.5))
    elif attack == SCALE:
        _tamper_arrays(reply, lambda a: Array(a.numpy() * np.float32(1e6)))
    elif attack == HUGE:
        arrays = reply.content["arrays"]
        for name in list(arrays.keys()):
            if np.dtype(arrays[name].dtype).kind == "f":
                arrays[name] = Array(np.full(tuple(arrays[name].shape), 3e38,
                                             dtype=np.dtype(arrays[name].dtype)))
    elif attack == HUGE_LOSS:
        metrics["train-loss"] = 1.7e308
    elif attack == NEGATIVE_LOSS:
        metrics["train-loss"] = -1.7e308
    elif attack == NO_LOSS:
        del metrics["train-loss"]
    elif attack == STALE:
        client = int(metrics["partition-id"])
        first = first_messages.setdefault(client, msg)
        if first is not msg:
            return Message(RecordDict(dict(reply.content.items())), reply_to=first)
    elif attack == EVAL_NO_LOSS:
        del metrics["eval-loss"]
    elif attack == EVAL_HUGE_LOSS:
        metrics["eval-loss"] = 1.7e308
    return reply


def hostile_app(attacks: Mapping[int, str]) -> ClientApp:
    """fedtune's ClientApp, except that each client in ``attacks`` runs its attack."""
    app = ClientApp()
    first_messages: dict[int, Message] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedtune_client.train(msg, context)
        attack = attacks.get(int(context.node_config["partition-id"]))
        if attack is None or attack in EVALUATE_ATTACKS:
            return reply
        return tamper(attack, msg, reply, first_messages)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = fedtune_client.evaluate_local(msg, context)
        attack = attacks.get(int(context.node_config["partition-id"]))
        return tamper(attack, msg, reply, {}) if attack in EVALUATE_ATTACKS else reply

    return app
