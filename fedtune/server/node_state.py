"""What a deployment's SuperNodes need to keep their clients' state on their own disks.

A SuperLink keeps each node's ``Context`` in memory for one Flower run; a restarted SuperLink
or a resumed fedtune run is a new Flower run, so every ``Context.state`` starts empty. A
SuperNode started with the node config ``state-dir`` keeps its client's state there instead
(``fedtune.client.node_state``), by round, under a key of the run. ``NodeStateGrid`` gives it
what it needs: every message it pushes carries the ConfigRecord ``protocol.NODE_STATE`` with
the run key (``RoundState.run_key``, checkpointed, so the same after ``--resume``), this
server session's id and the round it continues after (rounds after it that the node already
played are replayed, so their versions are void), and the round of the last checkpoint on disk
(older versions are no longer needed).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedtune import protocol
from fedtune.server.grid import WrappedGrid


def new_run_key() -> str:
    """A new run's key (OS entropy: it names folders, it decides nothing)."""
    return secrets.token_hex(16)


class NodeStateGrid(WrappedGrid):
    """A deployment's Grid whose every message carries ``protocol.NODE_STATE``."""

    def __init__(self, grid: Grid, run_key: str, session_start: int,
                 checkpointed_round: Callable[[], int]) -> None:
        """``session_start``: the round this session continues after; ``checkpointed_round``:
        the round of the last checkpoint on disk, now (0: none)."""
        super().__init__(grid)
        self.run_key = run_key
        self.session = secrets.token_hex(16)
        self.session_start = session_start
        self.checkpointed_round = checkpointed_round

    def _stamped(self, messages: Iterable[Message]) -> list[Message]:
        record = ConfigRecord({protocol.RUN_KEY: self.run_key, protocol.SESSION: self.session,
                               protocol.SESSION_START: self.session_start,
                               protocol.CHECKPOINTED_ROUND: self.checkpointed_round()})
        messages = list(messages)
        for message in messages:
            message.content[protocol.NODE_STATE] = record
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._stamped(messages))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(self._stamped(messages), timeout=timeout)
