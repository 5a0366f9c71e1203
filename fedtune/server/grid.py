"""What the server may ask of a simulated runtime's Grid, beyond Flower's ``Grid``.

Flower's ``Grid`` (push messages, pull replies) is all a SuperLink offers. fedtune's own
simulation runtimes (``fedtune.engine``) hold every client's ``Context`` themselves, so their
Grids also implement ``SimulatedGrid``: the server checkpoints the clients' ``Context.state``
and gives it back on resume, and drops what it stopped waiting for. The server checks for this
interface with ``isinstance``; a runtime that does not implement it (Flower's simulation, a
real deployment) keeps client states to itself.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class SimulatedGrid(Grid):
    """A Grid whose nodes are virtual clients this process controls."""

    _run: Run
    node_to_client: dict[int, int]  # node id -> client id (its partition)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @abstractmethod
    def changed_client_states(self) -> dict[int, bytes]:
        """Serialised Context.state of each client whose state changed since the last call
        (keyed by client id), for checkpoints."""

    @abstractmethod
    def restore_client_states(self, states: Mapping[int, bytes]) -> None:
        """Give clients back the Context.state a checkpoint recorded (keyed by client id)."""

    @abstractmethod
    def discard(self, message_ids: Iterable[str]) -> None:
        """Forget messages the server stopped waiting for; replies that still come are
        dropped."""
