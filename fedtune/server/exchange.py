"""Message exchange for one phase of a round, with any Flower ``Grid``.

``exchange`` pushes the messages a strategy configured, pulls replies as they arrive (so
progress can be shown per client) until all are in or the timeout passes, and measures the
bytes of arrays that went down and came back up. A reply is taken only if it answers a message
still waiting for one, from the node it was sent to; any other (a second answer, an answer to
an older message, one from another node) is dropped and counted, so it can neither end the
wait early nor reach the round.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedtune.protocol import array_bytes
from fedtune.server.grid import SimulatedGrid

PULL_INTERVAL_S = 0.05


@dataclass
class Exchange:
    """What one phase sent and got back."""

    sent: list[Message]
    replies: list[Message] = field(default_factory=list)
    sent_by_id: dict[str, Message] = field(default_factory=dict)  # message id -> instruction
    timed_out: list[int] = field(default_factory=list)  # node ids that did not answer in time
    dropped: int = 0  # replies that answered no waiting message of this phase
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def ok(self) -> list[Message]:
        return [r for r in self.replies if not r.has_error()]

    @property
    def failed(self) -> list[Message]:
        return [r for r in self.replies if r.has_error()]

    def instruction(self, reply: Message) -> Message:
        """The message this reply answers."""
        return self.sent_by_id[reply.metadata.reply_to_message_id]

    def node(self, reply: Message) -> int:
        """The node the answered message went to (a SuperLink answers for a lost one)."""
        return self.instruction(reply).metadata.dst_node_id


def _from_destination(reply: Message, node: int) -> bool:
    """The reply comes from the node the message went to, or is the SuperLink's error for it."""
    source = reply.metadata.src_node_id
    return source == node or (reply.has_error() and source == SUPERLINK_NODE_ID)


class RunStopped(RuntimeError):
    """The runtime stopped (or was stopped) while the server waited for replies."""


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout_s: float,
    on_reply: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Exchange:
    """Push, then pull until every message has a reply or ``timeout_s`` has passed.

    ``stop`` being set ends the wait at once with ``RunStopped``.
    """
    sent = list(messages)
    result = Exchange(sent=sent, bytes_down=sum(array_bytes(m) for m in sent))
    if not sent:
        return result
    ids = list(grid.push_messages(sent))
    result.sent_by_id = dict(zip(ids, sent, strict=True))
    destination = {i: m.metadata.dst_node_id for i, m in zip(ids, sent, strict=True)}
    pending = set(ids)
    # a grid that runs its clients one after another bounds each client's time itself, and
    # has run every message it was asked for once a pull returns nothing
    in_turn = getattr(grid, "runs_clients_in_turn", False)
    deadline = math.inf if in_turn else time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise RunStopped(f"stopped while waiting for {len(pending)} replies")
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            answered = reply.metadata.reply_to_message_id
            if answered not in pending or not _from_destination(reply, destination[answered]):
                result.dropped += 1
                continue
            pending.discard(answered)
            result.replies.append(reply)
            result.bytes_up += array_bytes(reply)
            if on_reply is not None:
                on_reply(len(result.replies), len(sent))
        if not arrived:
            if in_turn:
                break
            time.sleep(PULL_INTERVAL_S)
    result.timed_out = [destination[i] for i in pending]
    if pending and isinstance(grid, SimulatedGrid):  # drop what will not be pulled
        grid.discard(pending)
    return result
