"""fedtune: federated fine-tuning simulations on Flower, with privacy and real deployments.

The Python API (``fedtune.api``) is here: ``fedtune.run``, ``fedtune.sweep`` and
``fedtune.load_run``, and the callbacks ``fedtune.run`` takes (``fedtune.Callback``,
``fedtune.EarlyStopping``). It is imported on first use, so that ``import fedtune.config`` (and a
config error on the command line) loads no torch, Flower or Ray.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

import os as _os

# Ray warns at every start that a future release will change how it treats GPU env vars when
# no GPU is requested; fedtune asks for GPUs explicitly, so the warning is noise.
_os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

API = ("run", "sweep", "load_run", "RunResult", "SweepResult")
CALLBACKS = ("Callback", "EarlyStopping", "RoundEnd")  # fedtune.run(..., callbacks=[...])


def __getattr__(name: str) -> Any:
    if name in API:
        from fedtune import api

        return getattr(api, name)
    if name in CALLBACKS:
        from fedtune.server import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API, *CALLBACKS])
