"""The train and evaluate phases of a round, from any Grid.

A phase sends the messages a strategy configured and turns what comes back into what the round
needs: one ``ClientRow`` per addressed client, the accepted clients' metrics, and the replies
the strategy aggregates. Two ways lead there:

- **messages** (any Flower runtime: ``flwr run``, a SuperLink, custom ClientApps): every reply
  comes back as a Flower message and is screened here (``fedtune.server.screening``);
- **cohort** (fedtune's engines, a ``CohortGrid``): the grid trains the whole cohort with the
  client wing's own code and screens where the clients ran; for a strategy whose aggregate is
  the example-weighted mean it returns the sum of ``weight × update``, which reaches the
  strategy as one reply carrying the mean and the total weight (FedAvg's mean of that single
  reply is the reply itself, so Flower's strategies run unchanged); otherwise each accepted
  update reaches the strategy as its own reply. The Message API shape is kept as a view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtune import protocol
from fedtune.errors import one_line
from fedtune.results.run_dir import ClientRow
from fedtune.server.exchange import Exchange, exchange
from fedtune.server.grid import ClientReport, CohortGrid, CohortResult, CohortSpec
from fedtune.server.guard import bound_updates
from fedtune.server.identity import Identities
from fedtune.server.screening import (
    ReplyLimits,
    ScreenedReplies,
    screen_evaluate_replies,
    screen_train_replies,
)

Progress = Callable[[int, int], None]


@dataclass
class TrainPhase:
    """What the train phase of a round yielded."""

    sent: int
    rows: list[ClientRow]  # one per addressed client, by client id
    accepted: list[dict[str, Any]]  # metrics of the accepted clients, by client id
    declined: int  # clients that sent no update because their privacy budget is spent
    replies: list[Message]  # what the strategy aggregates
    bytes_up: int
    bytes_down: int
    dropped: int = 0  # replies that answered no waiting message (stale, duplicate, forged)


@dataclass
class EvaluatePhase:
    """The sound evaluation replies' metrics, and the bytes the phase moved."""

    metrics: list[dict[str, Any]]
    bytes_up: int
    bytes_down: int
    dropped: int = 0


@dataclass(frozen=True)
class UpdateBounds:
    """The model guard's rules for one round (``fedtune.server.guard``): 0 turns one off."""

    global_arrays: ArrayRecord  # the model the clients trained from
    max_norm: float = 0.0  # strategy.max_update_norm: clip each update to this L2 norm
    z_limit: float = 0.0  # strategy.update_norm_z: reject updates this many robust sds out

    @property
    def active(self) -> bool:
        return bool(self.max_norm or self.z_limit)

    def apply(self, replies: list[Message]) -> tuple[list[Message], list[tuple[Message, str]]]:
        """(kept replies, clipped where too long; outliers with their reason)."""
        if not self.active or not replies:
            return replies, []
        return bound_updates(protocol.to_numpy(self.global_arrays), replies, self.max_norm,
                             self.z_limit)


def uses_cohorts(grid: Grid, messages: Sequence[Message]) -> bool:
    """Whether ``grid`` can run these messages as one cohort (all share one content)."""
    return (isinstance(grid, CohortGrid) and grid.runs_cohorts and bool(messages)
            and all(m.content is messages[0].content for m in messages))


def sent_bytes(messages: Sequence[Message]) -> int:
    """Serialised size of the arrays the messages carry (a shared content counted once per
    message, measured once)."""
    sizes: dict[int, int] = {}
    total = 0
    for message in messages:
        key = id(message.content)
        if key not in sizes:
            sizes[key] = protocol.array_bytes(message)
        total += sizes[key]
    return total


# --- train -----------------------------------------------------------------------------------

def train_phase(grid: Grid, messages: list[Message], spec: CohortSpec, server_round: int,
                identities: Identities, bounds: UpdateBounds, timeout_s: float,
                progress: Progress, stop: threading.Event | None) -> TrainPhase:
    """Send the train ``messages`` and collect what the round needs from their replies:
    screened, then bounded (``bounds``; a cohort is then not summed where it ran, since the
    guard needs each update)."""
    if uses_cohorts(grid, messages):
        cohort = grid.run_cohort(messages, spec, timeout_s, progress, stop)
        return _train_from_cohort(cohort, messages, spec, server_round, bounds)
    train = exchange(grid, messages, timeout_s, progress, stop)
    screened = screen_train_replies(train, spec.limits, identities)
    screened.accepted, outliers = bounds.apply(screened.accepted)
    screened.rejected.extend(outliers)
    accepted = by_client(screened.accepted)
    return TrainPhase(
        sent=len(train.sent), rows=client_rows(server_round, train, screened, identities),
        accepted=[dict(protocol.first_metric_record(r)) for r in accepted],
        declined=len(screened.declined), replies=accepted, bytes_up=train.bytes_up,
        bytes_down=train.bytes_down, dropped=train.dropped)


def _train_from_cohort(cohort: CohortResult, messages: list[Message], spec: CohortSpec,
                       server_round: int, bounds: UpdateBounds) -> TrainPhase:
    sent_to = {m.metadata.dst_node_id: m for m in messages}
    accepted_reports = [r for r in cohort.reports if r.status == "ok"]
    replies: list[Message] = []
    if spec.weighted_mean:
        if accepted_reports:
            replies = [mean_reply(cohort, accepted_reports, messages[0])]
    else:
        by_reply = {}
        for report in accepted_reports:
            reply = _update_reply(cohort.updates[report.node_id], report.metrics,
                                  sent_to[report.node_id])
            by_reply[id(reply)] = report
            replies.append(reply)
        replies, outliers = bounds.apply(replies)
        for reply, reason in outliers:
            report = by_reply[id(reply)]
            report.status, report.reason = "rejected", reason
        accepted_reports = [by_reply[id(reply)] for reply in replies]
    return TrainPhase(
        sent=len(messages), rows=[_report_row(server_round, r) for r in cohort.reports],
        accepted=[r.metrics for r in accepted_reports],
        declined=sum(r.status == "declined" for r in cohort.reports), replies=replies,
        bytes_up=sum(r.bytes_up for r in cohort.reports), bytes_down=sent_bytes(messages))


def _report_row(server_round: int, report: ClientReport) -> ClientRow:
    """A clients.csv row from a cohort report: a rejected update's metrics are not recorded,
    as with a rejected message."""
    if report.status not in ("ok", "declined"):
        return ClientRow(server_round, report.client_id, None, None, None, None, report.status,
                         report.reason)
    metrics = report.metrics
    loss, epsilon = metrics.get(protocol.TRAIN_LOSS), metrics.get(protocol.EPSILON)
    trained = metrics.get(protocol.EXAMPLES_SEEN)
    return ClientRow(server_round, report.client_id, int(metrics[protocol.NUM_EXAMPLES]),
                     None if loss is None else float(loss),
                     None if epsilon is None else float(epsilon),
                     float(metrics[protocol.DURATION_S]),
                     "ok" if report.status == "ok" else "rejected", report.reason,
                     None if trained is None else int(trained))


def weighted_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Flower's ``aggregate_metricrecords`` over these metrics (each key's values weighted by
    ``num-examples`` over the total), in float64 and client order."""
    weights = [float(m[protocol.NUM_EXAMPLES]) for m in metrics]
    total = sum(weights)
    out: dict[str, Any] = {}
    for values, weight in zip(metrics, weights, strict=True):
        share = weight / total
        for key, value in values.items():
            if key == protocol.NUM_EXAMPLES:
                continue
            if isinstance(value, list):
                scaled = [float(v) * share for v in value]
                out[key] = ([a + b for a, b in zip(out[key], scaled, strict=True)]
                            if key in out else scaled)
            else:
                out[key] = out.get(key, 0.0) + float(value) * share
    return out


def mean_reply(cohort: CohortResult, accepted: Sequence[ClientReport], like: Message) -> Message:
    """One train reply carrying the example-weighted mean of the accepted updates, the weighted
    mean of their metrics and their total ``num-examples``: what a FedAvg-family strategy
    computes from all the replies, computed from the cohort's sum."""
    weight = cohort.total_weight
    arrays = like.content[protocol.ARRAYS]
    mean = {name: (cohort.total[name] / weight).astype(np.dtype(arrays[name].dtype))
            for name in cohort.total}
    total_examples = sum(int(r.metrics[protocol.NUM_EXAMPLES]) for r in accepted)
    metrics = MetricRecord({**weighted_metrics([r.metrics for r in accepted]),
                            protocol.NUM_EXAMPLES: total_examples})
    content = RecordDict({protocol.ARRAYS: protocol.to_array_record(mean),
                          protocol.METRICS: metrics})
    return Message(content=content, reply_to=like)


def _update_reply(records: Mapping[str, Mapping[str, np.ndarray]], metrics: Mapping[str, Any],
                  sent: Message) -> Message:
    """One accepted client's update as the reply message its strategy expects."""
    content = RecordDict({name: protocol.to_array_record(arrays)
                          for name, arrays in records.items()})
    content[protocol.METRICS] = MetricRecord(dict(metrics))
    return Message(content=content, reply_to=sent)


# --- evaluate --------------------------------------------------------------------------------

def evaluate_phase(grid: Grid, messages: list[Message], limits: ReplyLimits,
                   identities: Identities, timeout_s: float, progress: Progress,
                   stop: threading.Event | None) -> EvaluatePhase:
    """Send the evaluate ``messages``; the sound replies' metrics."""
    if uses_cohorts(grid, messages):
        cohort = grid.run_cohort(messages, CohortSpec(weighted_mean=False, limits=limits),
                                 timeout_s, progress, stop)
        return EvaluatePhase([r.metrics for r in cohort.reports if r.status == "ok"], 0,
                             sent_bytes(messages))
    federated = exchange(grid, messages, timeout_s, progress, stop)
    sound = [dict(protocol.first_metric_record(r))
             for r in screen_evaluate_replies(federated, limits, identities)]
    return EvaluatePhase(sound, federated.bytes_up, federated.bytes_down, federated.dropped)


# --- replies as rows -------------------------------------------------------------------------

def by_client(replies: list[Message]) -> list[Message]:
    """Replies in client order: float sums then do not depend on arrival order."""
    return sorted(replies, key=lambda reply: int(protocol.metric(reply, protocol.PARTITION_ID)))


def _last_line(text: str) -> str:
    """The exception line of a client's error (Ray wraps it in several tracebacks)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return one_line(line)
    return one_line(lines[-1] if lines else "unknown error")


def _reply_row(server_round: int, reply: Message, status: str, reason: str,
               client_id: int | None) -> ClientRow:
    """The row of a screened reply (its metrics hold what the schema says)."""
    epsilon = protocol.metric(reply, protocol.EPSILON)
    loss = protocol.metric(reply, protocol.TRAIN_LOSS)
    trained = protocol.metric(reply, protocol.EXAMPLES_SEEN)
    return ClientRow(server_round, client_id,
                     int(protocol.metric(reply, protocol.NUM_EXAMPLES)),
                     None if loss is None else float(loss),
                     None if epsilon is None else float(epsilon),
                     float(protocol.metric(reply, protocol.DURATION_S)), status, reason,
                     None if trained is None else int(trained))


def client_rows(server_round: int, train: Exchange, screened: ScreenedReplies,
                identities: Identities) -> list[ClientRow]:
    """One row per sampled client, its id the server's for the node (never the reply's): ok,
    rejected (bad reply, or no update because its privacy budget is spent), failed (error
    reply) or timeout (no reply)."""
    def client(reply: Message) -> int | None:
        return identities.client_of(train.node(reply))

    rows = [_reply_row(server_round, reply, "ok", "", client(reply))
            for reply in screened.accepted]
    rows += [_reply_row(server_round, reply, "rejected", reason, client(reply))
             for reply, reason in screened.declined]
    for reply, reason in screened.rejected:
        rows.append(ClientRow(server_round, client(reply), None, None, None, None, "rejected",
                              reason))
    for reply in train.failed:
        reason = _last_line(reply.error.reason)
        # an expired reply (a SuperLink's code; the Ray engine's for engine.client_timeout_s)
        status = "timeout" if reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE else "failed"
        rows.append(ClientRow(server_round, client(reply), None, None, None, None, status,
                              reason))
    for node in train.timed_out:
        rows.append(ClientRow(server_round, identities.client_of(node), None, None, None, None,
                              "timeout", "no reply within strategy.round_timeout_s"))
    return sorted(rows, key=lambda r: (r.client_id is None, r.client_id or 0))
