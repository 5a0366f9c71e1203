"""Client states on disk: each an immutable file named by the SHA-256 of its bytes.

A state's file is ``<run dir>/client_states/<first 2 hex digits>/<64 hex digits>`` (256
folders, so a million clients make folders of about 4,000 files). A file never changes once
written: a client whose state changes gets a new file, and the old one is deleted when nothing
references it any more (``fedtune.state.store``). Its name is its checksum, so every read is
verified, and writing a state that is already on disk writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from fedtune.errors import ConfigError

T = TypeVar("T")

STATE_DIR = "client_states"  # the run directory's folder of client state files
_NAME = re.compile("[0-9a-f]{64}")
# fsync of a small file takes ~0.6 ms on one thread here, an unlink up to 3 ms on a busy disk;
# 16 threads at once let the file system commit them together (fsync: ~0.13 ms a file,
# measured on this project's machine)
IO_THREADS = 16


class StateFileError(ConfigError):
    """A client state file that is missing or does not match its name (one line, naming it)."""


def digest_of(data: bytes) -> bytes:
    """The SHA-256 of a state's bytes: its name on disk."""
    return hashlib.sha256(data).digest()


def _each(function: Callable[[T], object], items: Iterable[T]) -> None:
    """``function`` on every item, IO_THREADS at a time (file system calls release the GIL)."""
    items = list(items)
    if items:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            list(pool.map(function, items))


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateBlobs:
    """The folder of one run's client state files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def write(self, digest: bytes, data: bytes) -> None:
        """Store ``data`` under ``digest`` unless it is there already (not yet fsync'ed: see
        ``sync``). The file appears whole or not at all."""
        path = self.path(digest)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)

    def write_all(self, states: Mapping[bytes, bytes]) -> None:
        """``write`` every (digest, bytes) of ``states``."""
        _each(lambda digest: self.write(digest, states[digest]), states)

    def read(self, digest: bytes) -> bytes:
        """The bytes stored under ``digest``, checked against it."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise StateFileError(f"client state file {path} cannot be read "
                                 f"({error.strerror or error})") from None
        if digest_of(data) != digest:
            raise StateFileError(f"client state file {path} does not match its name (its "
                                 "SHA-256): it was changed or damaged after it was written")
        return data

    def sync(self, digests: Iterable[bytes]) -> None:
        """Make the files of ``digests`` and their folders' entries durable."""
        paths = [self.path(digest) for digest in digests]
        if not paths:
            return
        _each(fsync_path, paths)
        _each(fsync_path, {path.parent for path in paths} | {self.root})

    def remove(self, digests: Iterable[bytes]) -> None:
        _each(lambda path: path.unlink(missing_ok=True), map(self.path, digests))

    def stored(self) -> set[bytes]:
        """The digests of every state file in the folder; left-over partial files go."""
        found: set[bytes] = set()
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for file in folder.iterdir():
                if file.name.endswith(".partial"):
                    file.unlink(missing_ok=True)
                elif _NAME.fullmatch(file.name) and file.name.startswith(folder.name):
                    found.add(bytes.fromhex(file.name))
        return found
