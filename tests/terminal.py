"""Run ``fedtune`` in a pseudo-terminal and read what a person would see: the final screen and
every frame of the live display (pyte, a VT100 emulator, renders the bytes)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass

import pyte

from tests.conftest import REPO

COLUMNS, LINES = 140, 300  # tall enough that nothing a run prints scrolls off the screen


@dataclass
class Terminal:
    """What the terminal showed: the final screen, the frames of the live display (the
    screen's non-empty lines after each read of the output), the exit code."""

    screen: list[str]
    frames: list[list[str]]
    returncode: int

    def lines(self) -> list[str]:
        """The final screen without trailing blank lines."""
        lines = list(self.screen)
        while lines and not lines[-1]:
            lines.pop()
        return lines


def run_in_terminal(*args: str, timeout: float = 600, env: dict | None = None,
                    columns: int = COLUMNS) -> Terminal:
    """``python -m fedtune ARGS`` with a terminal of ``columns`` x LINES as stdin, stdout and
    stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, columns, 0, 0))
    environment = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns),
                   "LINES": str(LINES), **(env or {})}
    environment.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdin=slave,
                               stdout=slave, stderr=slave, cwd=REPO, env=environment,
                               close_fds=True)
    os.close(slave)
    screen = pyte.Screen(columns, LINES)
    stream = pyte.ByteStream(screen)
    frames: list[list[str]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            stream.feed(data)  # rich writes each redraw of the live display at once
            frames.append([line.rstrip() for line in screen.display if line.strip()])
        else:
            process.kill()
            raise TimeoutError(f"fedtune {' '.join(args)} ran past {timeout}s")
    finally:
        os.close(master)
    returncode = process.wait(timeout=60)
    return Terminal([line.rstrip() for line in screen.display], frames, returncode)
