"""What each client addressed in a phase of a round did (``ClientReport``), and its clients.csv
row (``client_row``, the one place a row is built).

Both transports of a phase produce the same list of reports, one per addressed client: the
message path (``fedtune.server.phases``) from the replies it screened, the cohort path
(``fedtune.server.grid.CohortGrid``, fedtune's engines) from the clients it trained where they
ran. A report's status is ``ok`` (a sound reply), ``declined`` (local DP: "my budget is
spent"), ``rejected`` (a reply that broke the schema, or an update the guard refused),
``failed`` (the client raised, or its worker died) or ``timeout`` (no reply in time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune import protocol
from fedtune.errors import one_line
from fedtune.results.run_dir import ClientRow

if TYPE_CHECKING:
    from flwr.app import Message

TRAIN, EVALUATE = "train", "evaluate"  # clients.csv's phase column


@dataclass
class ClientReport:
    """One addressed client's outcome in one phase."""

    node_id: int
    client_id: int | None  # the server's id for the node (None: a node it does not know)
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # its reply metrics, when sound
    bytes_up: int = 0  # serialised size of the arrays its reply carries
    # an accepted train reply's update, kept one by one (record name -> arrays); None where the
    # cohort was summed where it ran, or the reply travels as received (``reply``)
    update: dict[str, dict[str, np.ndarray]] | None = None
    update_norm: float | None = None  # ‖w_k - w‖ of an accepted update (None: not known)
    reply: Message | None = None  # message path: the accepted reply as it came


def client_row(server_round: int, phase: str, report: ClientReport) -> ClientRow:
    """The clients.csv row of a report. A sound train reply (ok, or a decline, recorded as
    ``rejected`` with its reason) records its metrics; any other records none: what a rejected
    reply claims is not believed. (Only evaluations that did not count get a row: the sound
    ones are the federated evaluation of metrics.csv.)"""
    status = "rejected" if report.status == "declined" else report.status
    if report.status not in ("ok", "declined") or phase == EVALUATE:
        return ClientRow(server_round, report.client_id, None, None, None, None, status,
                         report.reason, phase=phase)
    metrics = report.metrics  # one constructor call: a round builds a row per client
    trained = metrics.get(protocol.EXAMPLES_SEEN)
    return ClientRow(server_round, report.client_id, int(metrics[protocol.NUM_EXAMPLES]),
                     _number(metrics.get(protocol.TRAIN_LOSS)),
                     _number(metrics.get(protocol.EPSILON)),
                     float(metrics[protocol.DURATION_S]), status, report.reason,
                     None if trained is None else int(trained), phase)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def by_client(reports: list[ClientReport]) -> list[ClientReport]:
    """Reports in client order (a node the server does not know last)."""
    return sorted(reports, key=lambda r: (r.client_id is None, r.client_id or 0))


def last_line(text: str) -> str:
    """The exception line of a client's error (Ray wraps it in several tracebacks)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return one_line(line)
    return one_line(lines[-1] if lines else "unknown error")
