"""``ClientStateStore``: every client's state, keyed by client id, within a memory budget.

What a client keeps across rounds (SCAFFOLD's ``c_i``, FedDyn's gradient, a local DP
accountant, a personal model) is a Flower ``RecordDict``, the ``Context.state`` a ClientApp
sees. The store holds it as bytes (``fedtune.state.codec``) with the SHA-256 of those bytes:

- **hot**: the most recently used states' bytes stay in memory, up to ``memory_budget`` bytes
  in all; beyond it the least recently used go to disk (``fedtune.state.blobs``: one immutable
  file per state, named by its SHA-256) and only their digest stays in memory;
- **checkpoints** (``snapshot``): a checkpoint records the map client id -> digest and makes
  durable only the states that are not on disk yet, so it writes what changed since the last
  one, not every client's state. After the checkpoint is in place (``checkpointed``), files
  that neither it nor the store references are deleted;
- a client without state costs nothing: the store holds only clients that have some.

Bytes rather than objects are kept because they are what travels anyway (to a Ray actor, to
disk), their size is the exact memory they take, and the digest that names a state on disk
says whether it changed. Flower keeps ``Context.state`` in a SuperNode's memory only and has no
store like this (flwr issues #2216, #1910); pfl-research keeps none either.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import RecordDict

from fedtune.config import Config
from fedtune.state.blobs import StateBlobs, StateFileError, digest_of
from fedtune.state.codec import state_from_bytes, state_to_bytes

MB = 1 << 20


@dataclass(frozen=True)
class StateSnapshot:
    """The store at one moment, for a checkpoint: each client's digest, and the bytes of the
    states that are not on disk yet (shared with the store, not copied: bytes never change;
    until the checkpoint is written they keep states the store has replaced since, so the
    store may hold up to twice its budget in between)."""

    digests: dict[int, bytes]  # client id -> SHA-256 of its state's bytes
    pending: dict[bytes, bytes] = field(default_factory=dict)  # digest -> bytes not on disk
    unsynced: frozenset[bytes] = frozenset()  # on disk, not yet fsync'ed

    def persist(self, blobs: StateBlobs) -> None:
        """Write the pending states and make every state the snapshot needs durable."""
        blobs.write_all(self.pending)
        blobs.sync(self.pending.keys() | self.unsynced)


class ClientStateStore:
    """Clients' states by client id: the recently used ones' bytes in memory, up to
    ``memory_budget`` bytes, the others on disk once ``open`` has named a folder."""

    def __init__(self, memory_budget: int) -> None:
        self.memory_budget = memory_budget
        self.blobs: StateBlobs | None = None
        self._digests: dict[int, bytes] = {}  # every client with state
        self._hot: OrderedDict[int, bytes] = OrderedDict()  # least recently used first
        self.hot_bytes = 0
        self._unwritten: set[int] = set()  # hot clients whose state is not on disk yet
        self._unsynced: set[bytes] = set()  # written to disk, not yet fsync'ed
        self._dropped: set[bytes] = set()  # digests no client holds any more: maybe garbage

    @classmethod
    def for_config(cls, config: Config) -> ClientStateStore:
        """An empty store with the run's ``engine.client_state_memory_mb``."""
        return cls(int(config.engine.client_state_memory_mb * MB))

    def open(self, directory: Path) -> None:
        """Spill to ``directory`` (a run's ``client_states/``) from now on."""
        if self.blobs is not None and self.blobs.root != directory and (
                len(self._hot) < len(self._digests)):
            raise ValueError(f"the client state store keeps states in {self.blobs.root}: it "
                             f"cannot move to {directory}")
        self.blobs = StateBlobs(directory)
        self._evict()

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, client: object) -> bool:
        return client in self._digests

    def clients(self) -> list[int]:
        """The ids of the clients that have state, in order."""
        return sorted(self._digests)

    def get(self, client: int) -> RecordDict | None:
        """Client ``client``'s state (a fresh object: change it, then ``put`` it), or None."""
        data = self.get_bytes(client)
        return None if data is None else state_from_bytes(data)

    def put(self, client: int, state: RecordDict) -> None:
        """Keep ``state`` as client ``client``'s state (an empty one removes it)."""
        self.put_bytes(client, state_to_bytes(state))

    def get_bytes(self, client: int) -> bytes | None:
        """Client ``client``'s state as bytes (``fedtune.state.codec``), or None."""
        data = self._hot.get(client)
        if data is not None:
            self._hot.move_to_end(client)
            return data
        digest = self._digests.get(client)
        if digest is None:
            return None
        assert self.blobs is not None  # a state left memory only for disk
        data = self.blobs.read(digest)
        self._hold(client, data)
        self._evict()
        return data

    def put_bytes(self, client: int, data: bytes) -> None:
        """``put`` for a state already turned into bytes."""
        if not data:
            self._remove(client)
            return
        digest = digest_of(data)
        previous = self._digests.get(client)
        if previous == digest:
            if client in self._hot:
                self._hot.move_to_end(client)
            return
        if previous is not None:
            self._dropped.add(previous)
        self._digests[client] = digest
        self._hold(client, data)
        self._unwritten.add(client)
        self._evict()

    def _remove(self, client: int) -> None:
        previous = self._digests.pop(client, None)
        if previous is None:
            return
        self._dropped.add(previous)
        data = self._hot.pop(client, None)
        if data is not None:
            self.hot_bytes -= len(data)
        self._unwritten.discard(client)

    def _hold(self, client: int, data: bytes) -> None:
        old = self._hot.pop(client, None)
        if old is not None:
            self.hot_bytes -= len(old)
        self._hot[client] = data
        self.hot_bytes += len(data)

    def _evict(self) -> None:
        """Move the least recently used states to disk until the rest fit the budget (not
        before ``open``: there is nowhere to put them)."""
        if self.blobs is None:
            return
        while self.hot_bytes > self.memory_budget and self._hot:
            client, data = self._hot.popitem(last=False)
            self.hot_bytes -= len(data)
            if client in self._unwritten:
                digest = self._digests[client]
                self.blobs.write(digest, data)
                self._unsynced.add(digest)
                self._unwritten.discard(client)

    # --- checkpoints ---

    def snapshot(self) -> StateSnapshot:
        """Every client's digest now, and what a checkpoint of this moment must still write."""
        return StateSnapshot(dict(self._digests),
                             {self._digests[client]: self._hot[client]
                              for client in self._unwritten},
                             frozenset(self._unsynced))

    def checkpointed(self, snapshot: StateSnapshot) -> None:
        """A checkpoint of ``snapshot`` has replaced the previous one: what it persisted is on
        disk for good (the snapshot lets go of those bytes), and the files only older
        checkpoints referenced are deleted."""
        self._unsynced -= snapshot.unsynced | snapshot.pending.keys()
        self._unwritten = {client for client in self._unwritten
                           if self._digests[client] not in snapshot.pending}
        snapshot.pending.clear()
        if self.blobs is None or not self._dropped:
            return
        held = set(self._digests.values())
        checkpointed = set(snapshot.digests.values())
        garbage = self._dropped - held - checkpointed
        self.blobs.remove(garbage)
        self._unsynced -= garbage
        # still in the checkpoint: garbage once a later checkpoint no longer references it
        self._dropped = (self._dropped & checkpointed) - held

    def restore(self, snapshot: StateSnapshot) -> None:
        """Hold exactly the states of a checkpoint's ``snapshot`` (after ``open``): files it
        does not reference are deleted (left by a run stopped after its checkpoint), a file it
        references but that is missing is a ``StateFileError``."""
        assert self.blobs is not None, "open the store before restoring it"
        snapshot.persist(self.blobs)  # states an older checkpoint held in itself
        stored = self.blobs.stored()
        wanted = set(snapshot.digests.values())
        missing = wanted - stored
        if missing:
            raise StateFileError(f"client state file {self.blobs.path(min(missing))} is missing "
                                 f"({len(missing)} of the checkpoint's {len(wanted)} client "
                                 "state files are)")
        self.blobs.remove(stored - wanted)
        self._digests = dict(snapshot.digests)
        self._hot.clear()
        self.hot_bytes = 0
        self._unwritten.clear()
        self._unsynced.clear()
        self._dropped.clear()
