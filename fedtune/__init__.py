"""fedtune: federated fine-tuning simulations on Flower, with privacy and real deployments."""

__version__ = "0.1.0"

import os as _os

# Ray warns at every start that a future release will change how it treats GPU env vars when
# no GPU is requested; fedtune asks for GPUs explicitly, so the warning is noise.
_os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
