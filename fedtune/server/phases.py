"""The train and evaluate phases of a round, from any Grid: one list of client reports, two
transports.

A phase sends the messages a strategy configured and turns what comes back into one
``ClientReport`` per addressed client (``fedtune.server.reports``), whichever way it went:

- **messages** (any Flower runtime: ``flwr run``, a SuperLink, custom ClientApps): every reply
  comes back as a Flower message and is screened here (``fedtune.server.screening``);
- **cohort** (fedtune's engines, a ``CohortGrid``): the grid trains the whole cohort with the
  client wing's own code and screens where the clients ran; for a strategy that opts into the
  summing aggregator (``fedtune.server.summing``) it also returns the accepted updates' sum.

Then one bounds step (``UpdateBounds``: ``strategy.max_update_norm``, ``update_norm_z``) and
one row builder (``fedtune.server.reports.client_row``) serve both, and ``aggregate_train``
hands the strategy its input: the sum's mean reply (summed where the clients ran, or here), or
each accepted update as its own reply, in client order.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.results.run_dir import ClientRow
from fedtune.server.exchange import Exchange, exchange
from fedtune.server.grid import CohortGrid, CohortSpec
from fedtune.server.guard import bound_updates, updates_of
from fedtune.server.identity import Identities
from fedtune.server.reports import (
    EVALUATE,
    TRAIN,
    ClientReport,
    by_client,
    client_row,
    last_line,
)
from fedtune.server.screening import ReplyLimits, screen_evaluate_replies, screen_train_replies
from fedtune.server.summing import WeightedSum, aggregate_sum, sum_updates

Progress = Callable[[int, int], None]
STATUSES = ("ok", "declined", "rejected", "failed", "timeout")


@dataclass
class TrainPhase:
    """What the train phase of a round yielded."""

    sent: list[Message]  # the train messages
    reports: list[ClientReport]  # one per addressed client, by client id
    summed: WeightedSum | None  # the accepted updates' sum where the clients ran
    bytes_up: int
    bytes_down: int
    dropped: int = 0  # replies that answered no waiting message (stale, duplicate, forged)

    @property
    def accepted_reports(self) -> list[ClientReport]:
        return [r for r in self.reports if r.status == "ok"]

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """The accepted clients' metrics, by client id."""
        return [r.metrics for r in self.accepted_reports]

    @property
    def declined(self) -> int:
        """Clients that sent no update because their privacy budget is spent."""
        return sum(r.status == "declined" for r in self.reports)

    def rows(self, server_round: int) -> list[ClientRow]:
        """clients.csv: a row per addressed client."""
        return [client_row(server_round, TRAIN, r) for r in self.reports]


@dataclass
class EvaluatePhase:
    """What the evaluate phase of a round yielded."""

    reports: list[ClientReport]  # one per addressed client, by client id
    bytes_up: int
    bytes_down: int
    dropped: int = 0

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The sound evaluations' metrics (the federated evaluation)."""
        return [r.metrics for r in self.reports if r.status == "ok"]

    def rows(self, server_round: int) -> list[ClientRow]:
        """clients.csv: a row per evaluation that did not count, with the reason."""
        return [client_row(server_round, EVALUATE, r) for r in self.reports if r.status != "ok"]


@dataclass(frozen=True)
class UpdateBounds:
    """The model guard's rules for one round (``fedtune.server.guard``): 0 turns one off."""

    global_arrays: ArrayRecord  # the model the clients trained from
    max_norm: float = 0.0  # strategy.max_update_norm: clip each update to this L2 norm
    z_limit: float = 0.0  # strategy.update_norm_z: reject updates this many robust sds out

    @property
    def active(self) -> bool:
        return bool(self.max_norm or self.z_limit)

    def apply(self, reports: list[ClientReport]) -> None:
        """The round's bounds step on its reports (in place; the updates must be kept one by
        one, not summed)."""
        if self.active:
            bound_updates(protocol.to_numpy(self.global_arrays), reports, self.max_norm,
                          self.z_limit)


def uses_cohorts(grid: Grid, messages: Sequence[Message]) -> bool:
    """Whether ``grid`` can run these messages as one cohort (all share one content)."""
    if not (isinstance(grid, CohortGrid) and grid.runs_cohorts and messages):
        return False
    content = messages[0].content
    return all(m.content is content for m in messages)


def cohort_bytes(messages: Sequence[Message]) -> int:
    """Serialised size of the arrays a cohort's messages carry (they share one content:
    ``uses_cohorts``), counted once per message, measured once."""
    return len(messages) * protocol.array_bytes(messages[0])


# --- train -----------------------------------------------------------------------------------

def train_phase(grid: Grid, messages: list[Message], spec: CohortSpec, server_round: int,
                identities: Identities, bounds: UpdateBounds, timeout_s: float,
                progress: Progress, stop: threading.Event | None) -> TrainPhase:
    """Send the train ``messages``; the reports of their clients, screened, then bounded
    (``bounds``; a cohort is then not summed where it ran, since the guard needs each
    update)."""
    if uses_cohorts(grid, messages):
        cohort = grid.run_cohort(messages, spec, timeout_s, progress, stop)
        summed = (None if cohort.total is None
                  else WeightedSum(cohort.total, cohort.total_weight))
        phase = TrainPhase(messages, cohort.reports, summed,
                           sum(r.bytes_up for r in cohort.reports), cohort_bytes(messages))
    else:
        train = exchange(grid, messages, timeout_s, progress, stop)
        reports = screen_train_replies(train, spec.limits, identities)
        phase = TrainPhase(messages, by_client(reports + unanswered(train, identities)), None,
                           train.bytes_up, train.bytes_down, train.dropped)
    bounds.apply(phase.reports)
    _log_phase(server_round, TRAIN, phase.reports)
    return phase


def aggregate_train(strategy: Strategy, server_round: int, train: TrainPhase,
                    summing: bool) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The strategy's aggregate of the accepted updates: with the summing aggregator
    (``summing``) their sum's mean reply, else each as its own reply, in client order."""
    accepted = train.accepted_reports
    if summing:
        summed, where = train.summed, "where the clients trained"
        if summed is None:
            summed, where = sum_updates(
                accepted, [updates_of(r)[protocol.ARRAYS] for r in accepted]), "by the server"
        return aggregate_sum(strategy, server_round, summed, accepted, where, train.sent[0])
    sent_to = {m.metadata.dst_node_id: m for m in train.sent}
    replies = [r.reply if r.reply is not None else update_reply(r, sent_to[r.node_id])
               for r in accepted]
    return strategy.aggregate_train(server_round, common_metrics(replies, accepted, sent_to))


def common_metrics(replies: list[Message], accepted: Sequence[ClientReport],
                   sent_to: Mapping[int, Message]) -> list[Message]:
    """The accepted clients' ``replies`` as a Flower strategy takes them: each one's metrics
    with the same keys, or Flower's ``validate_message_reply_consistency`` fails the whole
    aggregation. A metric only some carry - the ``train-loss`` a client that saw no example
    leaves out - is left out of all (metrics.csv's ``train_loss`` weighs those that carry it)."""
    keys = [set(reply.content[protocol.METRICS].keys()) for reply in replies]
    common = set.intersection(*keys) if keys else set()
    if all(len(k) == len(common) for k in keys):
        return replies
    shared = []
    for reply, report in zip(replies, accepted, strict=True):
        content = RecordDict(dict(reply.content.items()))
        content[protocol.METRICS] = MetricRecord(
            {k: v for k, v in reply.content[protocol.METRICS].items() if k in common})
        shared.append(Message(content=content, reply_to=sent_to[report.node_id]))
    return shared


def update_reply(report: ClientReport, sent: Message) -> Message:
    """An accepted client's update as the reply message its strategy expects."""
    records: Mapping[str, Mapping[str, np.ndarray]] = report.update or {}
    content = RecordDict({name: protocol.to_array_record(arrays)
                          for name, arrays in records.items()})
    content[protocol.METRICS] = MetricRecord(dict(report.metrics))
    return Message(content=content, reply_to=sent)


def _log_phase(server_round: int, phase: str, reports: Sequence[ClientReport]) -> None:
    """What the phase really did, client by client (log.txt)."""
    tally = Counter(r.status for r in reports)
    counts = {status: tally[status] for status in STATUSES}
    log(INFO, "fedtune: round %s %s: %s of %s clients ok%s", server_round, phase,
        counts["ok"], len(reports),
        "".join(f", {n} {status}" for status, n in counts.items() if n and status != "ok"))


# --- evaluate --------------------------------------------------------------------------------

def evaluate_phase(grid: Grid, messages: list[Message], limits: ReplyLimits, server_round: int,
                   identities: Identities, timeout_s: float, progress: Progress,
                   stop: threading.Event | None) -> EvaluatePhase:
    """Send the evaluate ``messages``; the reports of their clients."""
    if uses_cohorts(grid, messages):
        cohort = grid.run_cohort(messages, CohortSpec(weighted_mean=False, limits=limits),
                                 timeout_s, progress, stop)
        phase = EvaluatePhase(cohort.reports, 0, cohort_bytes(messages))
    else:
        federated = exchange(grid, messages, timeout_s, progress, stop)
        reports = screen_evaluate_replies(federated, limits, identities)
        phase = EvaluatePhase(by_client(reports + unanswered(federated, identities)),
                              federated.bytes_up, federated.bytes_down, federated.dropped)
    if messages:
        _log_phase(server_round, EVALUATE, phase.reports)
    return phase


# --- replies that did not come ---------------------------------------------------------------

def unanswered(sent: Exchange, identities: Identities) -> list[ClientReport]:
    """A report for each error reply (failed, or timeout: an expired reply, a SuperLink's code;
    the Ray engine's for engine.client_timeout_s) and each message without a reply."""
    reports = []
    for reply in sent.failed:
        node = sent.node(reply)
        status = ("timeout" if reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
                  else "failed")
        reports.append(ClientReport(node, identities.client_of(node), status,
                                    last_line(reply.error.reason)))
    for node in sent.timed_out:
        reports.append(ClientReport(node, identities.client_of(node), "timeout",
                                    "no reply within strategy.round_timeout_s"))
    return reports
