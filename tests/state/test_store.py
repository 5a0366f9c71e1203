"""The client state store: a memory budget with the rest on disk, files named and checked by
their SHA-256, checkpoints that write what changed and delete what nothing references."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.numpy import save_file

from fedtune.server.checkpoint import (
    MANIFEST,
    Checkpoint,
    read_checkpoint,
    sha256_of,
    write_checkpoint,
)
from fedtune.state.blobs import STATE_DIR, StateBlobs, StateFileError
from fedtune.state.codec import state_to_bytes
from fedtune.state.store import ClientStateStore, StateSnapshot

FLOATS = 1000  # a 4 kB state


def _state(client: int, version: int = 0) -> RecordDict:
    values = np.full(FLOATS, client + version / 10, dtype=np.float32)
    return RecordDict({"variate": ArrayRecord({"w": Array(values)}),
                       "counts": ConfigRecord({"version": version})})


def _size() -> int:
    return len(state_to_bytes(_state(0)))


def _files(run: Path) -> dict[str, int]:
    """State file name -> inode, for every file in the run's state folder."""
    return {path.name: path.stat().st_ino for path in (run / STATE_DIR).rglob("*")
            if path.is_file()}


def _checkpoint(run: Path, store: ClientStateStore, server_round: int) -> StateSnapshot:
    """What the Checkpointer does: snapshot, write, then let the store collect garbage."""
    snapshot = store.snapshot()
    write_checkpoint(run, Checkpoint(server_round, {"w": np.zeros(2)}, ({}, {}), ({}, {}),
                                     snapshot))
    store.checkpointed(snapshot)
    return snapshot


def _value(store: ClientStateStore, client: int) -> float:
    return float(store.get(client)["variate"]["w"].numpy()[0])


def test_states_round_trip_and_an_empty_state_is_no_state():
    store = ClientStateStore(memory_budget=1 << 20)
    assert len(store) == 0 and store.get(3) is None and 3 not in store
    store.put(3, _state(3, version=2))
    back = store.get(3)
    np.testing.assert_array_equal(back["variate"]["w"].numpy(), np.full(FLOATS, 3.2, np.float32))
    assert dict(back["counts"]) == {"version": 2}
    assert 3 in store and len(store) == 1 and store.clients() == [3]
    store.put(3, RecordDict())
    assert 3 not in store and len(store) == 0 and store.hot_bytes == 0


def _digest(client: int, version: int = 0) -> bytes:
    return hashlib.sha256(state_to_bytes(_state(client, version))).digest()


def test_states_beyond_the_budget_wait_on_disk_least_recently_used_first(tmp_path):
    size = _size()
    store = ClientStateStore(memory_budget=2 * size + size // 2)  # two states fit
    store.open(tmp_path / STATE_DIR)
    for client in range(5):
        store.put(client, _state(client))
    assert store.hot_bytes == 2 * size and len(store) == 5
    blobs = StateBlobs(tmp_path / STATE_DIR)
    # the three least recently used went to disk, each under its SHA-256
    assert blobs.stored() == {_digest(c) for c in range(3)}
    assert _value(store, 0) == 0.0  # read back from disk: 0 and 4 are in memory, 3 went
    assert blobs.stored() == {_digest(c) for c in range(4)}
    store.put(4, _state(4, version=1))  # replaces 4 in memory: 0 is the least recent
    store.put(1, _state(1, version=1))  # 0 leaves memory (already on disk: nothing written)
    assert blobs.stored() == {_digest(c) for c in range(4)}
    assert store.hot_bytes == 2 * size
    assert [_value(store, c) for c in range(5)] == pytest.approx([0, 1.1, 2, 3, 4.1])


def test_a_state_file_that_was_changed_is_refused_naming_it(tmp_path):
    store = ClientStateStore(memory_budget=0)  # every state on disk
    store.open(tmp_path / STATE_DIR)
    store.put(7, _state(7))
    (path,) = [p for p in (tmp_path / STATE_DIR).rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match=f"client state file {path} does not match its "
                                             "name"):
        store.get(7)


def test_a_checkpoint_writes_only_what_changed_and_deletes_what_nothing_references(tmp_path):
    store = ClientStateStore(memory_budget=1 << 20)
    store.open(tmp_path / STATE_DIR)
    for client in range(4):
        store.put(client, _state(client))
    assert _files(tmp_path) == {}  # in memory only, until a checkpoint
    snapshot = _checkpoint(tmp_path, store, 1)
    assert len(snapshot.pending) == 0  # written: the snapshot holds no state's bytes any more
    first = _files(tmp_path)
    assert len(first) == 4
    store.put(2, _state(2, version=1))
    store.put(5, _state(5))
    _checkpoint(tmp_path, store, 2)
    second = _files(tmp_path)
    old_2 = _digest(2).hex()
    assert old_2 not in second  # no checkpoint references it any more
    unchanged = {name: inode for name, inode in first.items() if name != old_2}
    assert {name: second[name] for name in unchanged} == unchanged  # not written again
    assert len(second) == 5
    digests = read_checkpoint(tmp_path).client_states.digests
    assert sorted(digests) == [0, 1, 2, 3, 5]
    assert digests[2] == _digest(2, version=1)


def test_a_checkpoint_syncs_the_state_files_before_its_manifest(tmp_path, monkeypatch):
    import os

    store = ClientStateStore(memory_budget=0)  # a state written while spilling, not synced
    store.open(tmp_path / STATE_DIR)
    store.put(1, _state(1))
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    _checkpoint(tmp_path, store, 1)
    state_file = str(StateBlobs(tmp_path / STATE_DIR).path(store.snapshot().digests[1]))
    manifest = str(tmp_path / "checkpoint.partial" / MANIFEST)
    assert events.index(state_file) < events.index(manifest)
    assert str(tmp_path / STATE_DIR) in events[:events.index(manifest)]


def test_restore_gives_back_the_checkpoint_and_drops_later_files(tmp_path):
    store = ClientStateStore(memory_budget=0)
    store.open(tmp_path / STATE_DIR)
    for client in range(3):
        store.put(client, _state(client))
    _checkpoint(tmp_path, store, 1)
    store.put(1, _state(1, version=5))  # after the checkpoint: a run stopped here
    assert len(_files(tmp_path)) == 4

    fresh = ClientStateStore(memory_budget=1 << 20)
    fresh.open(tmp_path / STATE_DIR)
    fresh.restore(read_checkpoint(tmp_path).client_states)
    assert [_value(fresh, c) for c in range(3)] == [0.0, 1.0, 2.0]
    assert len(_files(tmp_path)) == 3  # the file no checkpoint references is gone

    (StateBlobs(tmp_path / STATE_DIR).path(fresh.snapshot().digests[2])).unlink()
    with pytest.raises(StateFileError, match=r"is missing \(1 of the checkpoint's 3 client "
                                             r"state files are\)"):
        _restore(tmp_path)


def _restore(run: Path) -> ClientStateStore:
    store = ClientStateStore(memory_budget=0)
    store.open(run / STATE_DIR)
    store.restore(read_checkpoint(run).client_states)
    return store


def test_a_format_2_checkpoint_is_read_and_its_states_move_to_files(tmp_path):
    """Before the store, a checkpoint held every client's state bytes in clients.safetensors
    (format 2): such a checkpoint still resumes, its states written to state files."""
    write_checkpoint(tmp_path, Checkpoint(4, {"w": np.zeros(2)}, ({}, {}), ({}, {}),
                                          StateSnapshot({})))
    directory = tmp_path / "checkpoint"
    (directory / "client_states.safetensors").unlink()
    save_file({str(c): np.frombuffer(state_to_bytes(_state(c)), np.uint8) for c in (0, 3)},
              str(directory / "clients.safetensors"), metadata={"order": '["0", "3"]'})
    meta = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps({**meta, "format": 2}))
    names = ("global.safetensors", "strategy.safetensors", "rng.safetensors",
             "clients.safetensors", "state.json")
    (directory / MANIFEST).write_text(json.dumps({"format": 2, "config": "", "files": {
        name: sha256_of(directory / name) for name in names}}))
    store = _restore(tmp_path)
    assert store.clients() == [0, 3] and _value(store, 3) == 3.0
    assert len(_files(tmp_path)) == 2


def test_a_run_leaves_exactly_the_state_files_its_checkpoint_references(tmp_path):
    """SCAFFOLD with every variate on disk: each round replaces the clients' files, and after
    the run only those of the last checkpoint are left."""
    from fedtune.engine.inprocess import run_inprocess
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, "strategy.name=scaffold", "client.optimizer=sgd",
                         "client.lr=0.05", "run.rounds=3", "engine.client_state_memory_mb=0")
    run_dir = run_inprocess(config).path
    digests = read_checkpoint(run_dir).client_states.digests
    assert sorted(digests) == [0, 1, 2, 3]
    assert set(_files(run_dir)) == {digest.hex() for digest in digests.values()}
