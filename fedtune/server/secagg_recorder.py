"""What SecAgg+ did in a round, in the run's files (``SecAggRecorder``, a round listener).

The protocol runs inside the strategy (``fedtune.server.secagg_plus``), so the round sees only the
train exchange: clients that dropped at setup or share-keys were never sent a train message,
and a round whose unmasking failed still has sound replies. The recorder, the first listener
of a SecAgg+ run, completes the round's outcome before anything writes it:

- clients.csv: one row for each client that dropped before the train exchange (``failed`` or
  ``timeout``, the reason naming the stage: ``secagg setup: ...``), and for each client left in
  a key set-up that failed (``rejected``); a client whose train reply failed gets the stage in
  its reason (``secagg masked-input: ...``); a masked reply the protocol refused becomes
  ``rejected`` (a share that did not open: its sender, or the receiver that lied about it);
  a survivor that vanished at unmask keeps ``ok`` (its input was
  recovered from its neighbours' shares) with the reason saying so; a holder whose share failed
  its check is named; a pair whose key commitments disagree is named on both rows (neither is
  blamed); when the round failed, the client whose secret could not be recovered is
  ``rejected`` for it and every other ``ok`` client becomes ``rejected`` with the reason
  (``secure aggregation failed: ...``); that client is left out of every later round, and
  each round that samples it gets a ``rejected`` row, reason ``excluded: ...`` (the log says
  it once, in the round that named it). Node ids in reasons are given with their client ids;
- metrics.csv: the counts follow those rows, the stage messages' bytes are added, and a failed
  round's ``model_update`` says why;
- strategy_metrics.jsonl: the protocol's metrics (``secagg-*``) even when no aggregate came out;
- a failed round counts once as a round without update (``run.max_rounds_without_update``:
  the round itself counts it, the strategy having returned no model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from logging import INFO

from flwr.app import MetricRecord
from flwr.common import log

from fedtune import protocol
from fedtune.results.run_dir import ClientRow
from fedtune.server.loop import RunListener
from fedtune.server.round import FederatedRun, RoundOutcome
from fedtune.server.secagg_plus import RoundReport, SecAggPlus, report_metrics

_BEFORE_TRAIN = (protocol.STAGE_SETUP, protocol.STAGE_SHARE_KEYS)


class SecAggRecorder(RunListener):
    """Completes each round's rows with what the SecAgg+ protocol did."""

    def __init__(self, strategy: SecAggPlus) -> None:
        self.strategy = strategy  # the run's strategy (strategy.secure_aggregation)

    def round_ended(self, run: FederatedRun, outcome: RoundOutcome) -> None:
        report = self.strategy.finish_round()
        if report is None:
            return
        for node, client in report.node_to_client.items():  # a claim never replaces an identity
            if run.identities.client_of(node) is None:
                run.identities.claim(node, client)
        outcome.clients = _rows(report, outcome, run.identities.node_to_client)
        row = outcome.row
        row.clients_sampled = len(outcome.clients)
        row.clients_ok = sum(r.status == "ok" for r in outcome.clients)
        row.clients_failed = row.clients_sampled - row.clients_ok
        row.bytes_up += report.bytes_up
        row.bytes_down += report.bytes_down
        metrics = MetricRecord(dict(outcome.train_metrics or {}))
        metrics.update(report_metrics(report))
        outcome.train_metrics = metrics
        if report.failed:
            failed = _named(report.failed, run.identities.node_to_client)
            log(INFO, "fedtune: round %s: secure aggregation failed: %s", report.server_round,
                failed)
            if row.model_update == "applied" or "returned no model" in row.model_update:
                row.model_update = f"kept: secure aggregation failed: {failed}"
        if report.culprit is not None:
            log(INFO, "fedtune: round %s: %s is left out of every later round of secure "
                "aggregation: %s", report.server_round,
                _named(f"node {report.culprit}", run.identities.node_to_client),
                report.culprit_reason)


def _named(text: str, node_to_client: Mapping[int, int]) -> str:
    """``text`` with every "node N" whose client is known as "client C (node N)"."""
    def name(match: re.Match[str]) -> str:
        client = node_to_client.get(int(match.group(1)))
        return match.group(0) if client is None else f"client {client} ({match.group(0)})"

    return re.sub(r"node (\d+)", name, text)


def _rows(report: RoundReport, outcome: RoundOutcome, node_to_client: Mapping[int, int]
          ) -> list[ClientRow]:
    rows = list(outcome.clients)
    by_client = {row.client_id: row for row in rows if row.client_id is not None}
    server_round, failed = outcome.row.round, _named(report.failed, node_to_client)
    dropped = {dropout.node for dropout in report.dropped}
    for dropout in report.dropped:
        client = node_to_client.get(dropout.node)
        reason = _named(f"secagg {dropout.stage}: {dropout.reason}", node_to_client)
        row = by_client.get(client) if client is not None else None
        if dropout.stage in _BEFORE_TRAIN:  # never sent a train message: no row yet
            rows.append(ClientRow(server_round, client, None, None, None, None,
                                  dropout.status, reason))
        elif row is not None and dropout.stage == protocol.STAGE_MASKED_INPUT:
            if row.status == "ok":  # a sound reply the protocol left out
                row.status, row.reason = dropout.status, reason
            else:  # its train reply failed, timed out or was rejected: the row says how
                row.reason = f"secagg {dropout.stage}: {row.reason}"
        elif row is not None and dropout.stage == protocol.STAGE_UNMASK:
            row.reason = reason + "; its input was recovered from its neighbours' shares"
    for node, why in report.excluded.items():  # the culprit of an earlier round
        rows.append(ClientRow(server_round, node_to_client.get(node), None, None, None, None,
                              "rejected", f"excluded: {why}"))
    for node in set(report.sampled) - dropped - set(report.trained):  # the key set-up failed
        client = node_to_client.get(node)
        rows.append(ClientRow(server_round, client, None, None, None, None, "rejected",
                              f"secure aggregation failed: {failed}"))
    for holder, owners in report.tampered.items():
        row = by_client.get(node_to_client.get(holder))  # type: ignore[arg-type]
        if row is not None:
            row.reason = _named(f"secagg unmask: its share of node(s) {owners} failed the check "
                                "(tampered) and was left out", node_to_client)
    for pair in report.disagreeing:
        for node, other in (pair, pair[::-1]):
            row = by_client.get(node_to_client.get(node))  # type: ignore[arg-type]
            if row is not None and not row.reason:
                row.reason = _named(f"secagg share-keys: its key commitments and node {other}'s "
                                    "disagree (one of the two lies): the pair did not mask",
                                    node_to_client)
    if failed:
        culprit = by_client.get(node_to_client.get(report.culprit))  # type: ignore[arg-type]
        for row in rows:
            if row is culprit:
                row.status, row.reason = "rejected", (f"secagg unmask: {failed}; left out of "
                                                      "every later round")
            elif row.status == "ok":
                row.status, row.reason = "rejected", f"secure aggregation failed: {failed}"
    return sorted(rows, key=lambda r: (r.client_id is None, r.client_id or 0))
