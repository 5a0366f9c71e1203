"""Screen client replies before anything reads them: a bad reply is rejected with a reason.

Every reply is checked against the exact schema of ``fedtune.protocol`` (``ReplySchema``): the
records it holds (no more, no fewer, each of the right kind), every metric with its type and
range (no unknown metric, no missing one, no list where a number belongs, nothing non-finite),
the ``status`` record where the privacy mode has one. Each ArrayRecord must answer a record that
was sent (the same record, or the one it answers: the strategy's ``answers``) with the same
tensor names; each tensor is read the way ``numpy.load`` reads it (its ``.npy`` header, never
a pickle) and must *carry* the shape and dtype that was sent - what its metadata declares is
not trusted - with exactly that many bytes, all values finite. The partition id a reply
claims must be the one the server knows for the node that sent it, and ``num-examples`` must
be what the server knows that client holds (where it knows; any count up to
``MAX_ANY_EXAMPLES`` for private per-party files). An update far longer than the model it was
trained from is refused too (``fedtune.server.guard.absurd_update``).

The checks are pure functions of (what was sent, the reply, ``ReplyLimits``, the client id the
server holds for the node): no server state, so the engines screen a cohort's updates with
them where the clients ran (``check_update_arrays``, ``check_metric_values``,
``check_claims`` on decoded values), before adding them to a sum. Under a privacy mode
that lets clients decline (local DP), a reply without arrays whose ``status`` gives a reason
is a client saying its budget is spent (declined, not rejected); under any other mode such a
reply is rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SType
from torch import nn

from fedtune import protocol
from fedtune.config import Config
from fedtune.data.federation import ClientSizes, Federation
from fedtune.personal.split import kept_names
from fedtune.protocol import (
    EVALUATE_REPLY_SCHEMA,
    MAX_ANY_EXAMPLES,
    METRICS,
    NUM_EXAMPLES,
    NUM_STEPS,
    PARTITION_ID,
    REASON,
    STATUS,
    ReplySchema,
    decline_reply_schema,
    npy_view,
    train_reply_schema,
)
from fedtune.server.exchange import Exchange
from fedtune.server.guard import absurd_update, model_norm, update_norm
from fedtune.server.identity import Identities
from fedtune.server.reports import ClientReport
from fedtune.tables.strategies import STRATEGIES

RECORD_KINDS = {"ArrayRecord": ArrayRecord, "MetricRecord": MetricRecord,
                "ConfigRecord": ConfigRecord}


@dataclass(frozen=True)
class ReplyLimits:
    """What the server knows when it screens a reply; the same on every process of a run."""

    train: ReplySchema
    decline: ReplySchema | None  # a "budget spent" reply (None: the privacy mode allows none)
    evaluate: ReplySchema = EVALUATE_REPLY_SCHEMA
    num_clients: int | None = None  # partition ids are 0..num_clients-1 (None: unknown)
    train_sizes: Sequence[int] = ()  # each client's training examples (empty: unknown)
    test_sizes: Sequence[int] = ()  # each client's local test examples (empty: unknown)
    max_examples: int = MAX_ANY_EXAMPLES  # what a reply may claim where sizes are unknown
    masked: bool = False  # SecAgg+: a train reply carries its update masked
    # the steps a client takes in a round: local_steps, or local_epochs passes of its batches
    # (local_steps None: unknown, num-steps is not bounded)
    local_steps: int | None = None
    local_epochs: int = 1
    batch_size: int = 1
    # a personalised strategy's personal part: tensors of a training reply's ARRAYS that
    # must be exactly what was sent (a client keeps them; it never sends them)
    kept: tuple[str, ...] = ()

    def most_steps(self, examples: int) -> int | None:
        """The most local steps a client with ``examples`` training examples takes in a round
        (a loader's batch is at most its examples: ``fedtune.data.loaders``)."""
        if self.local_steps is None:
            return None
        if self.local_steps:
            return self.local_steps
        return self.local_epochs * -(-examples // max(1, min(self.batch_size, examples)))


def reply_limits(config: Config, federation: Federation,
                 model: Callable[[], nn.Module] | None = None) -> ReplyLimits:
    """The limits of a run: its strategy's and privacy mode's schemas, its clients' sizes (the
    server of a files dataset knows none) and, given what gives the run's ``model``, the
    personal part a personalised strategy's reply must carry as it was sent."""
    client = config.client
    entry = STRATEGIES[config.strategy.name]
    kept = () if model is None else tuple(kept_names(model, entry.personal_part,
                                                     entry.shared_part))
    return ReplyLimits(
        train=train_reply_schema(config.strategy.name, config.privacy.mode, asdict(client)),
        decline=decline_reply_schema(config.privacy.mode),
        num_clients=config.data.num_clients,
        train_sizes=ClientSizes(federation.train_sizes),
        test_sizes=ClientSizes(federation.test_sizes),
        masked=config.strategy.secure_aggregation, local_steps=client.local_steps,
        local_epochs=client.local_epochs, batch_size=client.batch_size, kept=kept)


# --- the pieces of a reply --------------------------------------------------------------------

def _check_records(reply: Message, schema: ReplySchema,
                   extra: Mapping[str, str] | None = None) -> str | None:
    """Exactly the records of ``schema`` (and ``extra``), each of the right kind."""
    expected = {**schema.records(), **(extra or {})}
    content = reply.content
    for name in content.keys():
        kind = type(content[name]).__name__
        if name not in expected:
            return f"unexpected record {name!r} ({kind})"
        if not isinstance(content[name], RECORD_KINDS[expected[name]]):
            return f"record {name!r} is a {kind}, not a {expected[name]}"
    missing = [name for name in expected if name not in content
               and (extra is None or name not in extra)]
    return f"no {missing[0]!r} record" if missing else None


def check_tensor(expected: Array, array: Array) -> str | None:
    """Why ``array`` does not carry a tensor like the sent ``expected``: what it declares and
    what its bytes hold (``protocol.npy_view``, read in place, never unpickled) must both be
    the sent shape and dtype, every value finite."""
    want = f"{expected.dtype}{list(expected.shape)}"
    if array.dtype != expected.dtype or tuple(array.shape) != tuple(expected.shape):
        return f"{array.dtype}{list(array.shape)} instead of {want}"
    if array.stype != SType.NUMPY:
        return f"serialised as {array.stype!r}, not {SType.NUMPY!r}"
    try:
        values = npy_view(array)
    except ValueError as error:
        return f"unreadable array ({error})"
    if values.dtype != np.dtype(expected.dtype) or values.shape != tuple(expected.shape):
        return f"declares {want} but carries {values.dtype}{list(values.shape)}"
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        return "non-finite values"
    return None


def check_update_arrays(expected: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                        record_name: str) -> str | None:
    """``check_tensor`` for arrays already decoded (the engines screen updates where the
    clients ran, before adding them to a sum): same names, shapes, dtypes, finite values."""
    if received.keys() != expected.keys():
        missing = sorted(set(expected) - set(received))
        extra = sorted(set(received) - set(expected))
        return f"{record_name}: tensor names differ (missing {missing[:3]}, extra {extra[:3]})"
    for name, values in received.items():
        reference = expected[name]
        if values.shape != reference.shape or values.dtype != reference.dtype:
            return (f"{record_name}.{name}: {values.dtype}{list(values.shape)} instead of "
                    f"{reference.dtype}{list(reference.shape)}")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{record_name}.{name}: non-finite values"
    return None


def _check_arrays(sent: Message, reply: Message, schema: ReplySchema) -> str | None:
    """Each ArrayRecord answers a sent record: the same tensor names, each ``check_tensor``."""
    for record_name, answered in schema.arrays.items():
        if answered not in sent.content or not isinstance(sent.content[answered], ArrayRecord):
            return f"array record {answered!r} was not sent"
        reference, received = sent.content[answered], reply.content[record_name]
        if set(received.keys()) != set(reference.keys()):
            missing = sorted(set(reference.keys()) - set(received.keys()))
            extra = sorted(set(received.keys()) - set(reference.keys()))
            return (f"{record_name}: tensor names differ (missing {missing[:3]}, "
                    f"extra {extra[:3]})")
        for name in received.keys():
            problem = check_tensor(reference[name], received[name])
            if problem:
                return f"{record_name}.{name}: {problem}"
    return None


def check_kept(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
               kept: Sequence[str]) -> str | None:
    """A personalised strategy's reply carries its personal part exactly as it was sent (bit
    for bit: the client keeps its own and puts the global values back)."""
    for name in kept:
        if not np.array_equal(sent[name], received[name]):
            return (f"{protocol.ARRAYS}.{name} is part of the client's personal part, which "
                    "must be sent back as received, but it differs")
    return None


def _check_metrics(reply: Message, schema: ReplySchema) -> str | None:
    return check_metric_values(reply.content[METRICS], schema)


def check_metric_values(record: Mapping[str, Any], schema: ReplySchema) -> str | None:
    """Exactly the schema's metrics: none unknown, none missing, each of its type and range."""
    for key in record.keys():
        declared = schema.metrics.get(key)
        if declared is None:
            return f"unexpected metric {key!r}"
        problem = declared.problem(key, record[key])
        if problem:
            return problem
    missing = [key for key, declared in schema.metrics.items()
               if declared.required and key not in record]
    if missing:
        return f"no {missing[0]!r} metric"
    if schema.client:
        return next((problem for key, declared in schema.metrics.items()
                     if (problem := declared.mismatch(key, record, schema.client))), None)
    return None


def check_metric_rows(records: Sequence[Mapping[str, Any]], schema: ReplySchema
                      ) -> list[str | None]:
    """``check_metric_values`` of each record, a chunk of clients' at once: where every record
    has the first one's keys and the first passes, each metric's values are checked together
    (their exact types, then finite and in range as one float64 array); a record with any
    value outside that - or an integer past 2**53, which float64 would round - goes through
    ``check_metric_values``, so every record gets the answer it alone would get. A chunk's
    metrics come from one code path (``fedtune.client.vectorised``): checked one at a time
    they cost ~5 us a client."""
    if not records:
        return []
    keys = tuple(records[0])
    if (any(tuple(record) != keys for record in records)
            or check_metric_values(records[0], schema) is not None):
        return _each_alone(records, schema)
    suspect = np.zeros(len(records), dtype=bool)
    for key in keys:
        declared = schema.metrics[key]
        values = [record[key] for record in records]
        allowed = (int,) if declared.kind is int else (int, float)
        if not all(type(value) in allowed for value in values):  # bool, numpy, ...: one by one
            return _each_alone(records, schema)
        try:
            column = np.array(values, dtype=np.float64)
        except OverflowError:
            return _each_alone(records, schema)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(column) | (np.abs(column) > 2.0**53)
            for bound, holds in ((declared.ge, column >= (declared.ge or 0)),
                                 (declared.gt, column > (declared.gt or 0)),
                                 (declared.le, column <= (declared.le or 0))):
                if bound is not None:
                    bad |= ~holds
        suspect |= bad
    fixed = [(key, declared) for key, declared in schema.metrics.items()
             if declared.equals is not None] if schema.client else []
    return [check_metric_values(record, schema) if alone
            else next((problem for key, declared in fixed
                       if (problem := declared.mismatch(key, record, schema.client))), None)
            for record, alone in zip(records, suspect, strict=True)]


def _each_alone(records: Sequence[Mapping[str, Any]], schema: ReplySchema) -> list[str | None]:
    """``check_metric_values`` of each record, one at a time."""
    return [check_metric_values(record, schema) for record in records]


def _check_status(reply: Message, schema: ReplySchema) -> str | None:
    if not schema.status:
        return None
    status = reply.content[STATUS]
    if set(status.keys()) != {REASON} or not isinstance(status[REASON], str):
        return f"record {STATUS!r} must hold one text {REASON!r}, not {sorted(status.keys())}"
    if schema.reason_required and not status[REASON].strip():
        return f"record {STATUS!r} gives no {REASON!r}"
    return None


def _check_claims(reply: Message, limits: ReplyLimits, client_id: int | None,
                  sizes: Sequence[int], fewest: int) -> str | None:
    return check_claims(reply.content[METRICS], limits, client_id, sizes, fewest)


def check_claims(metrics: Mapping[str, Any], limits: ReplyLimits, client_id: int | None,
                 sizes: Sequence[int], fewest: int) -> str | None:
    """The partition id is the node's (``client_id``, where the server knows it) and within
    the run; ``num-examples`` is what that client holds (where the server knows sizes), and
    ``num-steps`` no more than the run lets a client of that size take."""
    claimed, count = metrics[PARTITION_ID], metrics[NUM_EXAMPLES]
    if limits.num_clients is not None and claimed >= limits.num_clients:
        return f"{PARTITION_ID} = {claimed} is outside 0..{limits.num_clients - 1}"
    if client_id is not None and claimed != client_id:
        return f"{PARTITION_ID} = {claimed}, but the node that sent it is client {client_id}"
    who = claimed if client_id is None else client_id
    if sizes and who < len(sizes):
        if count != sizes[who]:
            return f"{NUM_EXAMPLES} = {count}, but client {who} holds {sizes[who]}"
    elif not fewest <= count <= limits.max_examples:
        return f"{NUM_EXAMPLES} = {count} is outside {fewest}..{limits.max_examples}"
    steps, most = metrics.get(NUM_STEPS), limits.most_steps(count)
    if steps is not None and most is not None and steps > most:
        return f"{NUM_STEPS} = {steps}, but client {who} takes at most {most} steps"
    return None


# --- whole replies ------------------------------------------------------------------------------

def check_train_reply(sent: Message, reply: Message, limits: ReplyLimits,
                      client_id: int | None = None) -> str | None:
    """Why a training update must not be aggregated (None: it is sound). ``client_id``: the
    client the server holds for the node that sent it (None: not known yet)."""
    problem = _train_reply_problem(sent, reply, limits, client_id)
    if problem:
        return problem
    global_arrays = _model_of(sent)
    return absurd_update(update_norm(global_arrays, _model_of(reply)), model_norm(global_arrays))


def _train_reply_problem(sent: Message, reply: Message, limits: ReplyLimits,
                         client_id: int | None) -> str | None:
    """``check_train_reply`` but the update's size."""
    schema = limits.train
    return (_check_records(reply, schema) or _check_metrics(reply, schema)
            or _check_status(reply, schema)
            or _check_claims(reply, limits, client_id, limits.train_sizes, fewest=1)
            or _check_arrays(sent, reply, schema)
            or (check_kept(_model_of(sent), _model_of(reply), limits.kept)
                if limits.kept else None))


def _model_of(message: Message) -> dict[str, np.ndarray]:
    """The ARRAYS record of a message (or of a screened reply), read in place."""
    return {name: npy_view(array) for name, array in message.content[protocol.ARRAYS].items()}


def check_masked_train_reply(reply: Message, limits: ReplyLimits,
                             client_id: int | None = None) -> str | None:
    """``check_train_reply`` for a SecAgg+ reply: its summed records travel masked in the
    one ArrayRecord ``SECAGG_MASKED`` beside the stage's ``SECAGG`` record, so only its records
    and metrics can be screened here (``fedtune.server.secagg_plus`` checks the masked vector's
    form; its values are hidden by design)."""
    schema = ReplySchema(arrays={protocol.SECAGG_MASKED: protocol.SECAGG_MASKED},
                         metrics=limits.train.metrics, status=limits.train.status)
    return (_check_records(reply, schema, {protocol.SECAGG: "ConfigRecord"})
            or _check_metrics(reply, schema) or _check_status(reply, schema)
            or _check_claims(reply, limits, client_id, limits.train_sizes, fewest=1))


def check_decline(reply: Message, limits: ReplyLimits,
                  client_id: int | None = None) -> str | None:
    """Why a reply is not a sound "my privacy budget is spent" (None: it is one)."""
    if limits.decline is None:
        return "no update (no ArrayRecord), and the privacy mode lets no client decline"
    schema = limits.decline
    return (_check_records(reply, schema) or _check_metrics(reply, schema)
            or _check_status(reply, schema)
            or _check_claims(reply, limits, client_id, limits.train_sizes, fewest=0))


def check_evaluate_reply(reply: Message, limits: ReplyLimits,
                         client_id: int | None = None) -> str | None:
    """Why an evaluation reply must not be averaged (None: it is sound)."""
    schema = limits.evaluate
    return (_check_records(reply, schema) or _check_metrics(reply, schema)
            or _check_claims(reply, limits, client_id, limits.test_sizes, fewest=0))


def check_personal_reply(reply: Message, schema: ReplySchema, limits: ReplyLimits,
                         client_id: int | None = None) -> str | None:
    """Why a personal evaluation reply must not enter personal.csv (None: it is sound): metrics
    only, of ``schema`` (``protocol.personal_reply_schema``), the node's partition id, and the
    local test examples the server knows that client holds."""
    problem = _check_records(reply, schema) or _check_metrics(reply, schema)
    if problem:
        return problem
    metrics = reply.content[METRICS]
    claimed = metrics[PARTITION_ID]
    if limits.num_clients is not None and claimed >= limits.num_clients:
        return f"{PARTITION_ID} = {claimed} is outside 0..{limits.num_clients - 1}"
    if client_id is not None and claimed != client_id:
        return f"{PARTITION_ID} = {claimed}, but the node that sent it is client {client_id}"
    who = claimed if client_id is None else client_id
    for key in schema.metrics:
        if not key.endswith("-examples"):
            continue
        count = metrics[key]
        if limits.test_sizes and who < len(limits.test_sizes) and count != limits.test_sizes[who]:
            return f"{key} = {count}, but client {who} holds {limits.test_sizes[who]}"
        model = key.removesuffix("-examples")
        measured = [f"{model}-{what}" in metrics for what in ("accuracy", "loss")]
        if measured != [bool(count)] * 2:
            return f"{model}-accuracy and -loss must be given exactly when {key} > 0"
    return None


def is_decline(reply: Message) -> bool:
    """Whether a training reply sends no update (carries no ArrayRecord): ``check_decline``
    says whether it is a sound "budget spent" under the run's privacy mode."""
    return not any(
        isinstance(reply.content[name], ArrayRecord) for name in reply.content.keys())


# --- a round's replies ------------------------------------------------------------------------

def screen_train_replies(train: Exchange, limits: ReplyLimits,
                         identities: Identities) -> list[ClientReport]:
    """A report for each reply of ``train`` that is not an error: ``ok`` (its update is sound;
    the report keeps the reply and its update's norm), ``declined`` (where the privacy mode
    lets a client decline) or ``rejected`` with the reason. A node the server does not know yet
    is identified by its first sound reply's partition id (``Identities.claim``)."""
    reports = []
    norms: dict[int, tuple[dict[str, np.ndarray], float]] = {}  # id(sent content) -> w, ‖w‖
    for reply in train.ok:
        node = train.node(reply)
        client_id = identities.client_of(node)
        sent = train.instruction(reply)
        declines = is_decline(reply)
        step = None
        if declines:
            reason = check_decline(reply, limits, client_id)
        elif limits.masked:
            reason = check_masked_train_reply(reply, limits, client_id)
        else:
            reason = _train_reply_problem(sent, reply, limits, client_id)
            if reason is None:
                if id(sent.content) not in norms:
                    model = _model_of(sent)
                    norms[id(sent.content)] = model, model_norm(model)
                model, norm = norms[id(sent.content)]
                step = update_norm(model, _model_of(reply))
                reason = absurd_update(step, norm)
        if reason is None and client_id is None:
            reason = identities.claim(node, protocol.metric(reply, PARTITION_ID))
            client_id = identities.client_of(node)
        report = ClientReport(node, client_id, "rejected", reason or "",
                              bytes_up=protocol.array_bytes(reply))
        if reason is None:
            report.metrics = dict(protocol.first_metric_record(reply) or {})
            if declines:
                report.status, report.reason = "declined", str(reply.content[STATUS][REASON])
            else:
                report.status, report.reply, report.update_norm = "ok", reply, step
        reports.append(report)
    return reports


def screen_evaluate_replies(evaluation: Exchange, limits: ReplyLimits,
                            identities: Identities) -> list[ClientReport]:
    """A report for each evaluation reply that is not an error: ``ok`` with its metrics (from
    nodes the server knows, or identifies now), or ``rejected`` with the reason."""
    reports = []
    for reply in evaluation.ok:
        node = evaluation.node(reply)
        client_id = identities.client_of(node)
        reason = check_evaluate_reply(reply, limits, client_id)
        if reason is None and client_id is None:
            reason = identities.claim(node, protocol.metric(reply, PARTITION_ID))
            client_id = identities.client_of(node)
        report = ClientReport(node, client_id, "rejected", reason or "")
        if reason is None:
            report.status = "ok"
            report.metrics = dict(protocol.first_metric_record(reply) or {})
        reports.append(report)
    return reports
