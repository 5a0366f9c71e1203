"""One writer per run directory: an exclusive ``flock`` on ``<run dir>/.lock`` while a run writes.

A second ``fedtune run --resume`` of the same directory (or any second writer) is refused with
a one-line error naming the process that holds the lock, instead of both appending rounds.
The operating system releases the lock when the holder exits, however it exits (SIGKILL
included), so a crash never leaves a stale lock behind (the file stays then, holding the last
holder's process id); a run that ends removes the file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from fedtune.errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(path):`` holds the run directory ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = self.path / LOCK_NAME
        while True:
            descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(descriptor)
                raise ConfigError(f"run directory {self.path} is in use by process {holder} "
                                  "(another fedtune run writes it): wait for it to end, or stop "
                                  "it") from None
            # the holder before may have removed the file between our open and our lock: a
            # lock on that orphan holds nothing, so take the file that is there now
            if _same_file(descriptor, lock_file):
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks it meanwhile) and
        let go."""
        if self._descriptor is not None:
            if _same_file(self._descriptor, self.path / LOCK_NAME):
                (self.path / LOCK_NAME).unlink()
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def check_unlocked(path: Path) -> None:
    """ConfigError if another process holds ``path``'s lock (it is not taken here)."""
    if (Path(path) / LOCK_NAME).is_file():
        RunLock(path).acquire().release()
