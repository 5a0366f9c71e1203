"""Errors a user can act on: each says, in one line, what was wrong and what is allowed.

The command line prints them as ``fedtune: error: ...`` without a traceback.

``one_line`` is the one way a text that came from outside (a client's reply or error, a file)
becomes a reason in a file or on a terminal: printable, one line, capped.
"""

from __future__ import annotations

import re

MAX_REASON = 400  # characters of a reason kept in clients.csv, metrics.csv and messages

# ANSI escape sequences (CSI ... final byte; other ESC sequences), then any other control
# character: C0 (newlines too), DEL, C1, and the Unicode bidirectional overrides that reorder
# what a terminal shows
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?|[\x00-\x1f\x7f-\x9f"
                      r"\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class ConfigError(ValueError):
    """A user error in the configuration: one line, names the key, the value, what is allowed."""


class ConfigWarning(UserWarning):
    """A setting that is allowed but does nothing here (a key the chosen settings ignore): one
    line naming the key. The command line prints it as ``fedtune: warning: ...``."""


def one_line(text: object, limit: int = MAX_REASON) -> str:
    """``text`` as one printable line of at most ``limit`` characters: escape sequences and
    control characters become spaces, runs of spaces one, characters UTF-8 cannot hold (lone
    surrogates) ``?``; a longer text is cut, saying how much was cut. One client's reply can
    then neither grow a file without bound nor paint a terminal."""
    line = _CONTROL.sub(" ", str(text))
    line = " ".join(line.encode("utf-8", "replace").decode("utf-8").split())
    if len(line) <= limit:
        return line
    note = f" [... cut, {len(line):,} characters in all]"
    return line[:max(0, limit - len(note))] + note
