"""Screen client replies before aggregation: a bad reply is rejected with a reason, never used.

A training reply must return, for every ArrayRecord it carries, one that was sent in the
instruction (same record name, or the sent record it answers: the strategy's ``answers`` in
``fedtune.tables.strategies``), with the same tensor names, shapes and dtypes, all values
finite; its MetricRecord must hold a positive integer ``num-examples`` (no larger than the
federation's training data, where that is known), an integer ``partition-id`` and finite
numbers. Arrays are read with ``numpy.load(allow_pickle=False)`` (Flower's ``Array.numpy``):
nothing received is unpickled. Under local DP a reply without arrays whose ``status`` gives a
reason is a client saying its privacy budget is spent (declined, not rejected).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedtune import protocol
from fedtune.protocol import NUM_EXAMPLES
from fedtune.server.exchange import Exchange


def _check_arrays(sent: ArrayRecord, received: ArrayRecord, record_name: str) -> str | None:
    if set(received) != set(sent):
        missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
        return f"{record_name}: tensor names differ (missing {missing[:3]}, extra {extra[:3]})"
    for name, array in received.items():
        expected = sent[name]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            return (f"{record_name}.{name}: {array.dtype}{list(array.shape)} instead of "
                    f"{expected.dtype}{list(expected.shape)}")
        try:
            values = array.numpy()
        except (ValueError, TypeError) as error:  # e.g. a pickled object array
            return f"{record_name}.{name}: unreadable array ({error})"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{record_name}.{name}: non-finite values"
    return None


def _check_metrics(reply: Message, max_examples: int, need_examples: bool) -> str | None:
    records = list(reply.content.metric_records.values())
    if len(records) != 1:
        return f"{len(records)} metric records instead of 1"
    metrics = records[0]
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric {key!r} is not finite"
    if NUM_EXAMPLES not in metrics:
        return f"no {NUM_EXAMPLES!r} metric"
    count = metrics[NUM_EXAMPLES]
    if isinstance(count, list) or float(count) != int(count):
        return f"{NUM_EXAMPLES} = {count!r} is not an integer"
    lowest = 1 if need_examples else 0
    if not lowest <= int(count) <= max_examples:
        return f"{NUM_EXAMPLES} = {count!r} is outside {lowest}..{max_examples}"
    return None


def check_train_reply(sent: Message, reply: Message, max_examples: int,
                      answers: Mapping[str, str] | None = None) -> str | None:
    """Why a training reply must not be aggregated, or None when it is sound. ``answers``:
    reply records that answer a sent record of another name (with the same tensors)."""
    received = reply.content.array_records
    if not received:
        return "no arrays in the reply"
    for record_name, record in received.items():
        answered = (answers or {}).get(record_name, record_name)
        if answered not in sent.content.array_records:
            return f"array record {answered!r} was not sent"
        problem = _check_arrays(sent.content.array_records[answered], record, record_name)
        if problem:
            return problem
    return _check_metrics(reply, max_examples, need_examples=True)


def check_folded_train_reply(reply: Message, max_examples: int) -> str | None:
    """``check_train_reply`` for a reply whose arrays went into a partial sum where the client
    ran (the Ray engine's ``engine.aggregate_on_actors``, which checked them there): its
    metrics."""
    return _check_metrics(reply, max_examples, need_examples=True)


def check_masked_train_reply(reply: Message, max_examples: int) -> str | None:
    """``check_train_reply`` for a SecAgg+ reply: its update is masked, so only its metrics
    can be screened here (``fedtune.server.secagg`` checks the masked vector's form; its values
    are hidden by design, so a client's bad values cannot be told from good ones)."""
    if set(reply.content.array_records) != {protocol.SECAGG_MASKED}:
        return f"a masked reply must carry only the ArrayRecord {protocol.SECAGG_MASKED!r}"
    return _check_metrics(reply, max_examples, need_examples=True)


def check_evaluate_reply(reply: Message, max_examples: int) -> str | None:
    """Why an evaluation reply must not be averaged, or None when it is sound."""
    return _check_metrics(reply, max_examples, need_examples=False)


def declined_reason(reply: Message, max_examples: int) -> str | None:
    """Why a client sent no update on purpose (its local privacy budget is spent), when its
    reply is otherwise sound; None for any other reply."""
    status = reply.content.config_records.get(protocol.STATUS)
    if (reply.content.array_records or status is None or not status.get(protocol.REASON)
            or check_evaluate_reply(reply, max_examples) is not None
            or not isinstance(protocol.metric(reply, protocol.PARTITION_ID), int)):
        return None
    return str(status[protocol.REASON])


@dataclass
class ScreenedReplies:
    """The sound train replies of one round, and the others with their reasons."""

    accepted: list[Message] = field(default_factory=list)
    declined: list[tuple[Message, str]] = field(default_factory=list)  # budget spent
    rejected: list[tuple[Message, str]] = field(default_factory=list)


def screen_train_replies(train: Exchange, max_examples: int, answers: Mapping[str, str],
                         accept_declines: bool) -> ScreenedReplies:
    """Sort the sound replies of ``train`` into accepted, declined (only where the privacy mode
    lets a client decline: ``accept_declines``) and rejected with a reason."""
    screened = ScreenedReplies()
    for reply in train.ok:
        reason = declined_reason(reply, max_examples) if accept_declines else None
        if reason is not None:
            screened.declined.append((reply, reason))
            continue
        if protocol.FOLDED in reply.content:  # its arrays were screened on the actor, then summed
            reason = check_folded_train_reply(reply, max_examples)
        elif protocol.SECAGG in reply.content:
            reason = check_masked_train_reply(reply, max_examples)
        else:
            reason = check_train_reply(train.instruction(reply), reply, max_examples, answers)
        if reason is None and not isinstance(protocol.metric(reply, protocol.PARTITION_ID), int):
            reason = f"{protocol.PARTITION_ID} is not an integer"
        if reason is None:
            screened.accepted.append(reply)
        else:
            screened.rejected.append((reply, reason))
    return screened
