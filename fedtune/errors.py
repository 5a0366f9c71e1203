"""Errors a user can act on: each says, in one line, what was wrong and what is allowed.

The command line prints them as ``fedtune: error: ...`` without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the configuration: one line, names the key, the value, what is allowed."""


class ConfigWarning(UserWarning):
    """A setting that is allowed but does nothing here (a key the chosen settings ignore): one
    line naming the key. The command line prints it as ``fedtune: warning: ...``."""
