"""Checkpoints of a running federation, and resuming from them.

A checkpoint is what the server needs to continue after round ``r`` as if it had never stopped:
the global weights, the strategy's state (FedAdam moments, SCAFFOLD's server variate, a central
DP accountant ...), the random number generators, every simulated client's state (where the
runtime keeps it: ``fedtune.state.store``), and small counters. It is written into
``<run dir>/checkpoint/`` as safetensors (arrays) plus ``state.json`` (everything else):
nothing is pickled, so reading one runs no code.

Client states are not copied into it: ``client_states.safetensors`` maps each client id to the
SHA-256 of its state, whose bytes are a file of that name in ``<run dir>/client_states/``
(``fedtune.state.blobs``), written and fsync'ed before the manifest. A checkpoint thus writes
only the states that changed since the previous one; files no checkpoint references any more
are deleted after the swap. A checkpoint of format 2 (every state's bytes in
``clients.safetensors``) is still read.

``manifest.json`` holds the SHA-256 of every other file of the checkpoint and of the run's
config (``config_digest``: the keys a resume may not change), so a file that was edited,
truncated or lost after it was written, or a config.toml edited since, is refused with a
one-line ``CheckpointError`` naming it. Checksums catch edits and corruption; they are no
signature (whoever may write the run directory may also rewrite the manifest). Every file and
the directory are fsync'ed before the checkpoint replaces the previous one, so after a power
cut the checkpoint on disk is whole.

Flower leaves checkpointing to the user (flwr issues #599, #357); the strategies keep their state
in plain attributes, so ``capture_attributes`` walks them generically instead of needing every
strategy to implement a protocol. A type it does not know is an error, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedtune.errors import ConfigError
from fedtune.state.blobs import STATE_DIR, StateBlobs, digest_of, fsync_path
from fedtune.state.store import StateSnapshot

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
STATE = "state.json"
_PARTIAL = ".partial"
_PREVIOUS = ".previous"
FORMAT_VERSION = 3  # 2: with manifest.json; 3: client states by digest
READABLE_FORMATS = (2, 3)
CLIENT_STATES = "client_states.safetensors"  # client id -> digest of its state
OLD_CLIENT_STATES = "clients.safetensors"  # format 2: every client state's bytes


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted or read (one line, naming the file)."""


# --- generic state of an object (a strategy and what it holds) --------------------------------

_Mapping = dict[str, Any]


class FrozenMapping(_Mapping):
    """A mapping its owner never changes again, holding only read-only arrays (and such
    mappings, lists, numbers, strings): its JSON node and arrays (copies only of those that do
    not own their data) are encoded once per path and reused by every later capture (the
    asynchronous loop's results of a training call: a capture after every server update walked
    each of them again). Restored as a dict."""

    encoded: tuple[str, dict[str, Any] | None, dict[str, np.ndarray]] | None = None


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """A JSON node for ``value``; arrays go into ``arrays`` under ``path``. None: not state."""
    if isinstance(value, FrozenMapping):
        if value.encoded is None or value.encoded[0] != path:
            own: dict[str, np.ndarray] = {}
            value.encoded = path, _encode(dict(value), path, own), own
        arrays.update(value.encoded[2])
        return value.encoded[1]
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    if isinstance(value, np.generic):
        return {"v": value.item()}
    if isinstance(value, np.ndarray):
        # a copy, as the owner may change it in place; not of a read-only array that owns its
        # data (nobody can: the asynchronous loop's results wait so, fedtune.server.async_loop)
        frozen = not value.flags.writeable and value.base is None and value.flags.c_contiguous
        arrays[path] = value if frozen else np.array(value, order="C")
        return {"a": path}
    if isinstance(value, torch.Tensor):
        arrays[path] = value.detach().cpu().numpy().copy()
        return {"t": path}
    if isinstance(value, ArrayRecord):
        names = list(value.keys())
        return {"record": {name: _encode(value[name].numpy(), f"{path}.{name}", arrays)
                           for name in names}}
    if isinstance(value, (list, tuple)):
        return {"seq": [_encode(item, f"{path}.{i}", arrays) for i, item in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"cannot checkpoint {path}: a mapping with non-string keys")
        return {"map": {key: _encode(item, f"{path}.{key}", arrays)
                        for key, item in value.items()}}
    if callable(value) or isinstance(value, ModuleType):
        return None  # functions and classes are configuration: the run config rebuilds them
    if hasattr(value, "__dict__"):
        return {"obj": _encode_attributes(value, path, arrays)}
    raise TypeError(f"cannot checkpoint {path}: unsupported type {type(value).__name__}")


def _encode_attributes(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    nodes = {}
    for name, value in vars(obj).items():
        node = _encode(value, f"{path}.{name}" if path else name, arrays)
        if node is not None:
            nodes[name] = node
    return nodes


def _decode(node: dict[str, Any], arrays: Mapping[str, np.ndarray], current: Any) -> Any:
    if "v" in node:
        return node["v"]
    if "a" in node:
        return arrays[node["a"]].copy()
    if "t" in node:
        return torch.from_numpy(arrays[node["t"]].copy())
    if "record" in node:
        record = ArrayRecord()
        for name, child in node["record"].items():
            record[name] = Array(_decode(child, arrays, None))
        return record
    if "seq" in node:
        items = [_decode(child, arrays, None) for child in node["seq"]]
        return tuple(items) if node["tuple"] else items
    if "map" in node:
        return {key: _decode(child, arrays, None) for key, child in node["map"].items()}
    if current is None:
        raise ValueError("checkpoint holds an object the freshly built strategy does not have")
    _restore_attributes(current, node["obj"], arrays)
    return current


def _restore_attributes(obj: Any, nodes: Mapping[str, Any],
                        arrays: Mapping[str, np.ndarray]) -> None:
    for name, node in nodes.items():
        setattr(obj, name, _decode(node, arrays, getattr(obj, name, None)))


def capture_attributes(obj: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON description, arrays) of every non-callable attribute of ``obj``, recursively."""
    arrays: dict[str, np.ndarray] = {}
    return _encode_attributes(obj, "", arrays), arrays


def restore_attributes(obj: Any, description: Mapping[str, Any],
                       arrays: Mapping[str, np.ndarray]) -> None:
    """Set the attributes ``capture_attributes`` recorded back onto a freshly built ``obj``."""
    _restore_attributes(obj, description, arrays)


# --- random number generators -----------------------------------------------------------------

def capture_rng() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Python's, NumPy's and torch's global generator states."""
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    arrays = {"numpy": keys, "torch": torch.get_rng_state().numpy()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"cuda.{index}"] = state.numpy()
    description = {"python": [version, list(words), gauss],
                   "numpy": [name, position, has_gauss, cached]}
    return description, arrays


def restore_rng(description: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    version, words, gauss = description["python"]
    random.setstate((version, tuple(words), gauss))
    name, position, has_gauss, cached = description["numpy"]
    np.random.set_state((name, arrays["numpy"], position, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(arrays["torch"].copy()))
    cuda = sorted(key for key in arrays if key.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(arrays[key].copy()) for key in cuda])


# --- the checkpoint on disk -------------------------------------------------------------------

@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    global_arrays: dict[str, np.ndarray]
    strategy: tuple[dict[str, Any], dict[str, np.ndarray]]
    rng: tuple[dict[str, Any], dict[str, np.ndarray]]
    client_states: StateSnapshot | None  # None: the runtime keeps them to itself
    counters: dict[str, Any] = field(default_factory=dict)


def _save_arrays(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """safetensors sorts names; the order is kept in its metadata because it matters (a
    strategy that draws noise tensor by tensor draws it in this order)."""
    save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, str(path),
              metadata={"order": json.dumps(list(arrays))})


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as handle:
        order = json.loads(handle.metadata()["order"])
        return {key: handle.get_tensor(key) for key in order}


def _save_client_states(snapshot: StateSnapshot, run_path: Path, path: Path) -> None:
    """Make the snapshot's state files durable and write its map client id -> digest."""
    snapshot.persist(StateBlobs(run_path / STATE_DIR))
    clients = sorted(snapshot.digests)
    digests = b"".join(snapshot.digests[client] for client in clients)
    _save_arrays({"client": np.array(clients, dtype=np.int64),
                  "digest": np.frombuffer(digests, dtype=np.uint8).reshape(len(clients), 32)},
                 path)


def _load_client_states(directory: Path) -> StateSnapshot:
    """The map of a format 3 checkpoint, or the states a format 2 one holds in itself."""
    if (directory / CLIENT_STATES).is_file():
        arrays = _load_arrays(directory / CLIENT_STATES)
        return StateSnapshot({int(client): digest.tobytes() for client, digest
                              in zip(arrays["client"], arrays["digest"], strict=True)})
    states = {int(client): data.tobytes()
              for client, data in _load_arrays(directory / OLD_CLIENT_STATES).items()}
    digests = {client: digest_of(data) for client, data in states.items()}
    return StateSnapshot(digests, {digests[client]: data for client, data in states.items()})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(run_path: Path, checkpoint: Checkpoint, config_digest: str = "") -> Path:
    """Write atomically and durably: each file and the manifest are fsync'ed, then the
    directory, before it replaces the previous checkpoint, so a kill or a power cut at any
    moment leaves the previous or the new checkpoint whole (the client state files it
    references are written and fsync'ed first). ``config_digest``: the run config's
    ``config_digest``, recorded in the manifest."""
    target = run_path / CHECKPOINT_DIR
    partial = run_path / (CHECKPOINT_DIR + _PARTIAL)
    previous = run_path / (CHECKPOINT_DIR + _PREVIOUS)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _save_arrays(checkpoint.global_arrays, partial / "global.safetensors")
    strategy_description, strategy_arrays = checkpoint.strategy
    _save_arrays(strategy_arrays, partial / "strategy.safetensors")
    rng_description, rng_arrays = checkpoint.rng
    _save_arrays(rng_arrays, partial / "rng.safetensors")
    states = checkpoint.client_states
    if states is not None:
        _save_client_states(states, run_path, partial / CLIENT_STATES)
    (partial / STATE).write_text(json.dumps({
        "format": FORMAT_VERSION,
        "round": checkpoint.server_round,
        "strategy": strategy_description,
        "rng": rng_description,
        "client_states": states is not None,
        "counters": checkpoint.counters,
    }, indent=1), encoding="utf-8")
    files = sorted(partial.iterdir())
    for file in files:
        fsync_path(file)
    (partial / MANIFEST).write_text(json.dumps({
        "format": FORMAT_VERSION, "config": config_digest,
        "files": {file.name: sha256_of(file) for file in files}}, indent=1), encoding="utf-8")
    fsync_path(partial / MANIFEST)
    fsync_path(partial)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    partial.rename(target)
    fsync_path(run_path)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def find_checkpoint(run_path: Path) -> Path | None:
    """The complete checkpoint directory of a run (the previous one if a kill hit a swap)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + _PREVIOUS):
        if (run_path / name / STATE).is_file():
            return run_path / name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold a JSON object")
    return value


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose every file matches it; CheckpointError naming the
    first that does not (or is missing)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint file {manifest_path} is missing: the checkpoint "
                              "cannot be verified (made by a fedtune without manifests, or "
                              "damaged)")
    manifest = _read_json(manifest_path)
    files = manifest.get("files")
    if manifest.get("format") not in READABLE_FORMATS or not isinstance(files, dict) \
            or STATE not in files:
        raise CheckpointError(f"checkpoint file {manifest_path} is not a format "
                              f"{' or '.join(map(str, READABLE_FORMATS))} manifest")
    for name, digest in files.items():
        path = directory / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if sha256_of(path) != digest:
            raise CheckpointError(f"checkpoint file {path} does not match {MANIFEST}: it was "
                                  "changed or damaged after the checkpoint was written")
    return manifest


def checkpoint_round(run_path: Path) -> int | None:
    """The round a run's checkpoint was written after (None: no checkpoint)."""
    directory = find_checkpoint(run_path)
    if directory is None:
        return None
    round_ = _read_json(directory / STATE).get("round")
    if not isinstance(round_, int):
        raise CheckpointError(f"checkpoint file {directory / STATE} has no round number")
    return round_


def read_checkpoint(run_path: Path) -> Checkpoint:
    """The verified checkpoint of a run; CheckpointError (one line, naming the file) for one
    that is missing, does not match its manifest, or cannot be read."""
    directory = find_checkpoint(run_path)
    if directory is None:
        raise CheckpointError(f"{run_path} has no checkpoint (set run.checkpoint_every, or "
                              "stop a run with Ctrl-C, to write one)")
    verify_checkpoint(directory)
    meta = _read_json(directory / STATE)
    current = STATE
    try:
        states = None
        if meta["client_states"]:
            current = CLIENT_STATES if meta["format"] == FORMAT_VERSION else OLD_CLIENT_STATES
            states = _load_client_states(directory)
        current = "global.safetensors"
        global_arrays = _load_arrays(directory / current)
        current = "strategy.safetensors"
        strategy = (meta["strategy"], _load_arrays(directory / current))
        current = "rng.safetensors"
        rng = (meta["rng"], _load_arrays(directory / current))
        current = STATE
        return Checkpoint(server_round=int(meta["round"]), global_arrays=global_arrays,
                          strategy=strategy, rng=rng, client_states=states,
                          counters=dict(meta["counters"]))
    except (KeyError, TypeError, ValueError, OSError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint file {directory / current} cannot be read "
                              f"({type(error).__name__}: {error})") from None
