"""What travels between the server and the clients: every record and metric key, one spelling.

Both wings import this module and never each other. Keys follow Flower's own style
(``num-examples``, ``server-round``): lower case, words joined by hyphens.

A **train message** holds the ArrayRecord ``ARRAYS`` (the global model's travelling tensors),
the ConfigRecord ``CONFIG`` (``SERVER_ROUND`` and what the strategy adds: ``proximal-mu``,
``feddyn-alpha``, ``fednova``) and, for SCAFFOLD, the ArrayRecord ``scaffold-control``.
Its **reply** holds ``ARRAYS`` (the client's model), records that answer a sent record
(``fedtune.tables.strategies``: SCAFFOLD's ``scaffold-control-delta``), the MetricRecord
``METRICS`` and, under local DP, the ConfigRecord ``STATUS``. A client whose privacy budget
allows no step replies without arrays, its ``STATUS`` saying why.

An **evaluate message** holds ``ARRAYS`` and ``CONFIG``; its reply holds ``METRICS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

# --- records of a message ----------------------------------------------------------------------
ARRAYS = "arrays"  # Flower's default arrayrecord_key
CONFIG = "config"  # Flower's default configrecord_key
METRICS = "metrics"
STATUS = "status"  # ConfigRecord of a train reply: REASON why training stopped early

# --- config record ------------------------------------------------------------------------------
SERVER_ROUND = "server-round"
REASON = "reason"

# --- metric record of a train reply -------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # what FedAvg weights by (Flower's weighted_by_key)
EXAMPLES_SEEN = "examples-seen"
NUM_STEPS = "num-steps"
DURATION_S = "duration-s"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # local DP: the client's ε so far (left out when it is infinite)
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"

# --- metric record of an evaluate reply ---------------------------------------------------------
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# --- node config (set by every runtime, or flower-supernode --node-config) ----------------------
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"

# --- a client's Context.state (kept by the runtime between rounds) ------------------------------
ACCOUNTANT_STATE = "dp-accountant"  # local DP: the client's DP-SGD history
SCAFFOLD_STATE = "scaffold-client-control"
FEDDYN_STATE = "feddyn-gradient"

MAX_ANY_EXAMPLES = 10**9  # what a reply may claim where the server knows no data sizes


def first_metric_record(message: Message) -> MetricRecord | None:
    """The first MetricRecord of a message, found without ``RecordDict.metric_records`` (which
    copies every record)."""
    return next((r for r in message.content.values() if isinstance(r, MetricRecord)), None)


def metric(message: Message, key: str) -> Any:
    """A value of the first MetricRecord (None when the key or the record is missing)."""
    record = first_metric_record(message)
    return None if record is None else record.get(key)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (their order kept)."""
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays (read with ``allow_pickle=False``)."""
    return {name: array.numpy() for name, array in record.items()}


def array_bytes(message: Message) -> int:
    """Serialised size of the arrays a message carries."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())
