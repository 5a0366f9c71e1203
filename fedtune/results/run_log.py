"""<run dir>/log.txt: what libraries and workers say while a run lasts, kept out of the terminal.

A run prints progress and results; everything else - Python warnings (Opacus, torch,
transformers), log records (Flower's included), worker output that Ray forwards to the driver,
and what C extensions write to the process's stderr - goes to the run's log.txt instead. With
``echo`` (``fedtune run -v``) log records also reach the terminal, and nothing is redirected.

Flower's logger keeps one handler of its own and also passes records to the root logger, so
once another library configures the root (Opacus calls ``logging.basicConfig`` on import) every
Flower line prints twice; ``single_flower_lines`` stops that pass-through.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LOG_NAME = "log.txt"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_libraries() -> None:
    """Before a run: no hub downloads, no tokenizer fork warnings, Ray workers' lines plain,
    Flower's records at INFO (into log.txt inside ``capture_run_log``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray forwards each worker line to the driver: plain text, every line (no colour codes,
    # no "[repeated 3x across cluster]" summaries), read before Ray is imported
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.supercore.logger import FLOWER_LOGGER  # importing it resets its level

    FLOWER_LOGGER.setLevel(logging.INFO)


def single_flower_lines() -> None:
    """Flower's records reach the terminal through Flower's own handler only."""
    logging.getLogger("flwr").propagate = False


@dataclass
class RunLog:
    """The open log of a run: where it is and how many warnings it holds so far."""

    path: Path
    counter: _Counter

    @property
    def warnings(self) -> int:
        return self.counter.count


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextmanager
def capture_run_log(run_dir: Path, echo: bool = False,
                    terminal: TextIO | None = None) -> Iterator[RunLog]:
    """Send warnings, log records and stray output to ``run_dir``/log.txt (created, or
    appended to on resume) until the block ends. ``echo``: log records go to the terminal too
    (``terminal``, default the process's stderr) and output is not redirected."""
    # Flower's logger gets its console handler when flwr is first imported: import it now,
    # while the handler can still bind the real stderr, and route its records below
    importlib.import_module("flwr.supercore.logger")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_NAME
    handle = path.open("a", encoding="utf-8", buffering=1)
    to_file = logging.StreamHandler(handle)
    to_file.setFormatter(logging.Formatter(FORMAT))
    counter = _Counter()
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    saved = (list(root.handlers), root.level, list(flower.handlers), flower.propagate,
             sys.stdout, sys.stderr)
    ours: list[logging.Handler] = [to_file, counter]
    if echo:
        to_terminal = logging.StreamHandler(terminal or sys.stderr)
        to_terminal.setFormatter(logging.Formatter(FORMAT))
        ours.append(to_terminal)
    root.handlers[:] = ours  # a library's basicConfig() in the run finds a handler and adds none
    root.setLevel(logging.INFO)
    flower.handlers[:] = []  # its console handler; its records reach ours through the root
    flower.propagate = True
    logging.captureWarnings(True)
    stderr_fd = None
    try:
        with warnings.catch_warnings():  # Python's own filters: what would have been shown
            if not echo:
                sys.stdout.flush()
                sys.stderr.flush()
                sys.stdout = sys.stderr = handle
                stderr_fd = os.dup(2)
                os.dup2(handle.fileno(), 2)  # C extensions and child processes too
            yield RunLog(path, counter)
    finally:
        if stderr_fd is not None:
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved[0], saved[1]
        flower.handlers[:], flower.propagate = saved[2], saved[3]
        sys.stdout, sys.stderr = saved[4], saved[5]
        handle.close()
