"""A SuperNode's own disk for its client's state, so that it outlives a SuperLink restart and a
resumed run (a deployment; fedtune's simulations keep state in ``fedtune.state.store``).

Flower keeps a node's ``Context.state`` in the SuperNode's memory for one Flower run: a
restarted SuperLink, a restarted SuperNode or a resumed fedtune run (each a new Flower run)
starts from an empty state, and SCAFFOLD's variates, FedDyn's gradient, a local DP accountant
or a personal model are lost. With the node config ``state-dir`` (``flower-supernode
--node-config "partition-id=0 state-dir='/var/lib/fedtune'"``), ``node_state_mod`` keeps it in
``<state-dir>/<run key>/client-<partition-id>/``, one file per round the client's state changed
in, named ``<round>-<SHA-256 of its bytes>.state`` (checked on read, written atomically and
fsync'ed), from what the server sends with every message (``protocol.NODE_STATE``,
``fedtune.server.node_state``):

- a Context without this run's state (the first message of a Flower run, or of a restarted
  SuperNode) gets the newest version from before the message's round; later messages of the
  same Flower run go on from the Context, and each one's state is saved under its round;
- a new server session (a resumed run) replays the rounds after its checkpoint: versions of
  those rounds, left by the session it replaces, are deleted first, so a replayed round starts
  from the state it started from the first time and ends bit-identical;
- versions older than the newest one a resume may still need (at or before the server's last
  checkpoint) are deleted.

A personal evaluation (``protocol.PERSONAL_MESSAGE_TYPE``) of a round reads the state after that
round and writes nothing. SecAgg+'s per-round key material (``protocol.SECAGG_STATE``) is never
written: it lives for one round of one session.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedtune import protocol
from fedtune.state.blobs import fsync_path
from fedtune.state.codec import state_from_bytes, state_to_bytes

_VERSION = re.compile(r"(\d{8})-([0-9a-f]{64})\.state")
_KEY = re.compile(r"[0-9a-f]{32}")
_SESSION_FILE = "session"
_NOT_KEPT = (protocol.NODE_STATE, protocol.SECAGG_STATE)


class NodeStateError(ValueError):
    """A node state file, or a server's ``NODE_STATE`` record, this client cannot use."""


class NodeStateFiles:
    """The versions of one client's state in one run, by round."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def versions(self) -> list[tuple[int, Path]]:
        """(round, file) of every version, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(match[1]), path) for path in self.folder.iterdir()
                 if (match := _VERSION.fullmatch(path.name))]
        return sorted(found)

    def load_before(self, server_round: int) -> RecordDict:
        """The newest state saved in a round before ``server_round`` (empty: none)."""
        older = [path for round_, path in self.versions() if round_ < server_round]
        if not older:
            return RecordDict()
        path = older[-1]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != _VERSION.fullmatch(path.name)[2]:
            raise NodeStateError(f"node state file {path} does not match its name (its "
                                 "SHA-256): it was changed or damaged after it was written")
        return state_from_bytes(data)

    def _write(self, name: str, data: bytes) -> None:
        """A file of the folder, whole or not at all, durably."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / (name + ".partial")
        partial.write_bytes(data)
        fsync_path(partial)
        os.replace(partial, self.folder / name)
        fsync_path(self.folder)

    def save(self, server_round: int, data: bytes) -> None:
        """Keep ``data`` as the state after ``server_round`` (replacing an earlier version of
        that round)."""
        path = self.folder / f"{server_round:08d}-{hashlib.sha256(data).hexdigest()}.state"
        if path.exists():
            return
        self._write(path.name, data)
        for round_, other in self.versions():
            if round_ == server_round and other != path:
                other.unlink()

    def start_session(self, session: str, start: int) -> None:
        """The first message of a server session that continues after round ``start``: the
        versions of later rounds belong to the session it replaces."""
        marker = self.folder / _SESSION_FILE
        if marker.is_file() and marker.read_text(encoding="ascii") == session:
            return
        for round_, path in self.versions():
            if round_ > start:
                path.unlink()
        self._write(_SESSION_FILE, session.encode("ascii"))

    def prune(self, checkpointed_round: int) -> None:
        """Delete the versions older than the newest one at or before ``checkpointed_round``
        (the oldest a resume can go back to)."""
        versions = self.versions()
        kept = [i for i, (round_, _) in enumerate(versions) if round_ <= checkpointed_round]
        for _, path in versions[:kept[-1]] if kept else []:
            path.unlink()


def _node_record(message: Message) -> ConfigRecord:
    record = message.content[protocol.NODE_STATE]
    for key in (protocol.RUN_KEY, protocol.SESSION):
        if not _KEY.fullmatch(str(record.get(key, ""))):
            raise NodeStateError(f"{protocol.NODE_STATE}.{key} = {record.get(key)!r} is not "
                                 "allowed: must be 32 hex digits")
    return record


def node_state_mod(message: Message, context: Context,
                   call_next: ClientAppCallable) -> Message:
    """Flower client mod: keep this client's state in the node's ``state-dir`` (see the module
    doc); without that node config, or from a server that sends no ``NODE_STATE``, it does
    nothing."""
    state_dir = context.node_config.get(protocol.STATE_DIR)
    if not state_dir or protocol.NODE_STATE not in message.content:
        return call_next(message, context)
    record = _node_record(message)
    run_key = str(record[protocol.RUN_KEY])
    client = int(context.node_config[protocol.PARTITION_ID])
    files = NodeStateFiles(Path(str(state_dir)) / run_key / f"client-{client}")
    files.start_session(str(record[protocol.SESSION]), int(record[protocol.SESSION_START]))
    server_round = protocol.message_round(message.content)
    # a personal evaluation of round r reads the state after r, and changes nothing
    reads_only = message.metadata.message_type == protocol.PERSONAL_MESSAGE_TYPE
    state = context.state
    marker = state.get(protocol.NODE_STATE)
    if not isinstance(marker, ConfigRecord) or marker.get(protocol.RUN_KEY) != run_key:
        state.clear()
        state.update(files.load_before(server_round + reads_only))
        state[protocol.NODE_STATE] = ConfigRecord({protocol.RUN_KEY: run_key})
    reply = call_next(message, context)
    if not reply.has_error() and not reads_only:
        kept = RecordDict({name: value for name, value in state.items()
                           if name not in _NOT_KEPT})
        if len(kept) or files.versions():
            files.save(server_round, state_to_bytes(kept))
        files.prune(int(record[protocol.CHECKPOINTED_ROUND]))
    return reply
