"""What the tests of clients trained together hand a chunk: the global model and a round's
content (tests/engine/test_vectorised.py, tests/privacy/test_private_chunks.py)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedtune.models.weights import shared_state
from fedtune.protocol import CONFIG, SERVER_ROUND
from fedtune.task import TaskResources


def moved_global_arrays(resources: TaskResources, seed: int = 0) -> dict[str, np.ndarray]:
    """The resident model's travelling arrays, moved off its initial weights."""
    rng = np.random.default_rng(seed)
    return {name: (value + rng.normal(0, 0.05, value.shape)).astype(value.dtype)
            for name, value in shared_state(resources.model).items()}


def round_content(server_round: int) -> RecordDict:
    """A train message's content without the model: the server round alone."""
    return RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
