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

The **exact reply schema** (``ReplySchema``: ``train_reply_schema``, ``decline_reply_schema``,
``EVALUATE_REPLY_SCHEMA``) says which records a reply holds and which metrics, with their
types and ranges, and nothing else: the core metrics below, plus what the strategy's and the
privacy mode's table entries declare (FedNova's ``fednova-a``; local DP's ``epsilon``,
``noise-multiplier``, ``sample-rate`` and its ``status``). ``fedtune.server.screening`` checks
every reply against it before anything reads the reply. A metric that is not ``required`` may be
left out, and is checked where present: ``train-loss`` by a client that saw no example, local
DP's ``epsilon`` while it is infinite.

With **secure aggregation** (SecAgg+, ``fedtune.server.secagg_plus`` and
``fedtune.client.secagg_stages``) the key set-up and the unmasking are messages of type
``SECAGG_MESSAGE_TYPE`` whose ConfigRecord ``SECAGG`` holds the stage and its values; the train
message also carries ``SECAGG`` (the forwarded encrypted shares), and its reply carries, instead
of the summed ArrayRecords, the ArrayRecord ``SECAGG_MASKED`` (one masked integer vector
``MASKED``) beside ``METRICS``.

In a **deployment** (any Grid that is not a fedtune simulation) every message also carries the
ConfigRecord ``NODE_STATE``: the run's ``RUN_KEY`` (the same across ``--resume``), this server
session's ``SESSION`` and the round it continues after (``SESSION_START``), and the round of the
server's last durable checkpoint (``CHECKPOINTED_ROUND``). A SuperNode started with the node
config ``STATE_DIR`` keeps its client's state there by round (``fedtune.client.node_state``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from numpy.lib import format as npy_format

from fedtune.tables import ReplyMetric
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES

# --- records of a message ----------------------------------------------------------------------
ARRAYS = "arrays"  # Flower's default arrayrecord_key
CONFIG = "config"  # Flower's default configrecord_key
METRICS = "metrics"
STATUS = "status"  # ConfigRecord of a train reply: REASON why training stopped early

# --- config record ------------------------------------------------------------------------------
SERVER_ROUND = "server-round"
# an asynchronous server's training call (``fedtune.server.async_loop``): a client is in at most
# one dispatch per call, so (run.seed, round, client, call) names one dispatch and seeds it
DISPATCH = "dispatch"
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
STATE_DIR = "state-dir"  # a SuperNode keeps its client's state in this folder (deployment)

# --- what a SuperNode needs to keep its client's state (every message of a deployment) -------
NODE_STATE = "node-state"  # ConfigRecord of every message to a SuperNode
RUN_KEY = "run-key"  # 32 hex digits: new for every run, the same when it resumes
SESSION = "session"  # 32 hex digits: new every time the server starts or resumes the run
SESSION_START = "session-start"  # the round this session continues after (0: a new run)
CHECKPOINTED_ROUND = "checkpointed-round"  # the round of the server's last durable checkpoint
# node config: this node accepts privacy.insecure_reproducible_noise (fedtune's simulated
# runtimes set it when the run asks for it; a deployed SuperNode only if its operator does)
INSECURE_NOISE_ALLOWED = "insecure-noise-allowed"
INSECURE_NOISE_KEY = "privacy.insecure_reproducible_noise"  # its run config key

# --- a client's Context.state (kept by the runtime between rounds) ------------------------------
ACCOUNTANT_STATE = "dp-accountant"  # local DP: the client's DP-SGD history
SCAFFOLD_STATE = "scaffold-client-control"
FEDDYN_STATE = "feddyn-gradient"
PERSONAL_STATE = "personal-model"  # personalisation: the client's own tensors (head or model)
PERSONAL_MIX_STATE = "personal-mix"  # APFL: the client's mixing weight alpha

# --- personal evaluation where the clients live (a runtime that keeps no ClientStateStore) ---
PERSONAL_ACTION = "personal"
PERSONAL_MESSAGE_TYPE = f"query.{PERSONAL_ACTION}"  # evaluate your own models on your test split
PERSONAL_LOCAL_ONLY = "local-only"  # config: also train alone and evaluate that model
PERSONAL_MODELS = ("global", "personalised", "local_only")  # personal.csv's models, in order


def personal_metric(model: str, what: str) -> str:
    """The reply metric of one model's ``accuracy``, ``loss`` or ``examples``
    (``personalised-accuracy``, ...)."""
    return f"{model.replace('_', '-')}-{what}"


# --- secure aggregation (SecAgg+, Bell et al. 2020) -------------------------------------------
SECAGG_ACTION = "secagg"
SECAGG_MESSAGE_TYPE = f"query.{SECAGG_ACTION}"  # its own stages (Flower's "<category>.<action>")
SECAGG = "secagg"  # ConfigRecord of every SecAgg+ message and reply
SECAGG_MASKED = "secagg-masked"  # ArrayRecord of a masked train reply
MASKED = "masked"  # its one array: the masked, quantised, weighted update (unsigned integers)
SECAGG_STATE = "secagg-state"  # a client's Context.state: its keys and shares of one round
# stages, in order (the train exchange is the masked-input stage)
STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_UNMASK = "unmask"
SECAGG_STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT, STAGE_UNMASK)
# keys of the SECAGG ConfigRecord (node ids travel as decimal strings: they are uint64)
SA_STAGE = "stage"
SA_SESSION = "session"  # random per round: binds every message and share to one run of it
SA_ROUND = "round"
SA_NODES = "nodes"  # setup: the sampled node ids
SA_DEGREE = "degree"  # setup: k, neighbours per client
SA_THRESHOLD = "threshold"  # setup: t, shares that reconstruct a secret
SA_GRAPH_SEED = "graph-seed"  # setup: public seed of the neighbour graph
SA_BITS = "bits"  # setup: quantisation levels are 2**bits - 1
SA_RING_BITS = "ring-bits"  # setup: masked values live modulo 2**ring_bits (32 or 64)
SA_CLIP_RANGE = "clip-range"  # setup: values are clipped to [-clip, clip] before quantising
SA_DP_CLIP = "dp-clip"  # setup, distributed DP: L2 bound of every client's update (0 = none)
SA_DP_STD = "dp-noise-std"  # setup, distributed DP: each client's Gaussian noise std
SA_WEIGHT = "weight"  # setup: what weights a client's input (a reply metric, "1", "a/b")
SA_RECORDS = "records"  # setup: the reply ArrayRecords that enter the sum, in order
SA_DELTAS = "deltas"  # setup: for each, whether it is summed relative to the sent record
SA_KEPT = "kept"  # setup: tensors of a relative record no client sends (its personal part)
SA_PK_MASK = "pk-mask"  # setup reply: public key for pairwise masks
SA_PK_SEAL = "pk-seal"  # setup reply: public key for encrypting shares
SA_COMMITMENT = "commitment"  # share-keys reply: SHA-256 commitment to the self-mask seed
SA_PEERS = "peers"  # share-keys: neighbours; masked-input: sources of the forwarded shares
SA_CIPHERTEXTS = "ciphertexts"  # share-keys reply and masked-input: encrypted shares
SA_SEAL_OUT = "seal-out"  # share-keys reply: per peer, commitment to this client's key to it
SA_SEAL_IN = "seal-in"  # share-keys reply: per peer, commitment to the peer's key to this one
SA_REFUSED = "refused"  # masked-input reply: peers whose forwarded share did not open
SA_REVEALED = "revealed"  # masked-input reply: for each, the key it did not open with
SA_RECEIVED = "received"  # masked-input reply: for each, the share as it arrived
SA_ALIVE = "alive"  # unmask: neighbours whose masked input arrived
SA_DEAD = "dead"  # unmask: neighbours that dropped after sharing keys
SA_OWNERS = "owners"  # unmask reply: whose share each entry of SA_SHARES is
SA_SHARES = "shares"  # unmask reply: Shamir shares (self-mask seeds of alive, keys of dead)
# train metrics the SecAgg+ strategy adds (strategy_metrics.jsonl)
SECAGG_SURVIVORS = "secagg-survivors"
SECAGG_DROPPED = "secagg-dropped"
SECAGG_FAILED = "secagg-failed"  # 1: too few clients or shares: no aggregate this round
SECAGG_ROUNDING_BOUND = "secagg-rounding-bound"  # largest quantisation error of a coordinate
SECAGG_CLIPPED = "secagg-clipped"  # coordinates clipped to the range, over all clients
SECAGG_DP_CLIP_BOUND = "secagg-dp-clip-bound"  # distributed DP: η, fedtune.secagg.distributed_dp
SECAGG_SERVER_S = "secagg-server-s"  # CPU seconds the server spent in the protocol

MAX_ANY_EXAMPLES = 10**9  # what a reply may claim where the server knows no data sizes
# a loss beyond this means the model diverged: refused, so that a mean of losses stays finite
# (a reply of 1.7e308 would otherwise write inf into metrics.csv)
MAX_LOSS = 1e12
MAX_DURATION_S = 1e9  # about 30 years

# --- the exact schema of a reply ----------------------------------------------------------------

TRAIN_METRICS: dict[str, ReplyMetric] = {
    NUM_EXAMPLES: ReplyMetric(int, ge=0),  # further bounded by what the server knows
    EXAMPLES_SEEN: ReplyMetric(int, ge=0),
    NUM_STEPS: ReplyMetric(int, ge=0),
    DURATION_S: ReplyMetric(float, ge=0, le=MAX_DURATION_S),
    PARTITION_ID: ReplyMetric(int, ge=0),
    # a local objective may add terms of either sign; left out by a client that saw no example
    # (local DP-SGD whose every Poisson sample was empty: it stepped on noise alone)
    TRAIN_LOSS: ReplyMetric(float, required=False, ge=-MAX_LOSS, le=MAX_LOSS),
}
EVALUATE_METRICS: dict[str, ReplyMetric] = {
    EVAL_LOSS: ReplyMetric(float, ge=0, le=MAX_LOSS),
    EVAL_ACCURACY: ReplyMetric(float, ge=0, le=1),
    NUM_EXAMPLES: ReplyMetric(int, ge=0),
    PARTITION_ID: ReplyMetric(int, ge=0),
}


@dataclass(frozen=True)
class ReplySchema:
    """Exactly what one kind of reply holds: its ArrayRecords (each answering a sent record of
    the same tensors), its metrics, whether it carries ``STATUS``; no other record or metric."""

    arrays: Mapping[str, str] = field(default_factory=dict)  # reply record -> sent record
    metrics: Mapping[str, ReplyMetric] = field(default_factory=dict)
    status: bool = False  # the ConfigRecord STATUS: {REASON: text}
    reason_required: bool = False  # STATUS must give a reason (a decline says why)
    # the run's [client] settings, for metrics whose value they fix (``ReplyMetric.equals``;
    # empty: such metrics are checked against their bounds only)
    client: Mapping[str, Any] = field(default_factory=dict)

    def records(self) -> dict[str, str]:
        """Record name -> the kind of record it must be."""
        kinds = {name: "ArrayRecord" for name in self.arrays}
        kinds[METRICS] = "MetricRecord"
        if self.status:
            kinds[STATUS] = "ConfigRecord"
        return kinds


def train_reply_schema(strategy: str, privacy_mode: str,
                       client: Mapping[str, Any] | None = None) -> ReplySchema:
    """A training update under ``strategy.name`` and ``privacy.mode``; ``client``: the run's
    ``[client]`` settings (what fixes some strategies' metrics, FedNova's ``fednova-a``)."""
    entry, mode = STRATEGIES[strategy], PRIVACY_MODES[privacy_mode]
    return ReplySchema(arrays={ARRAYS: ARRAYS, **entry.answers},
                       metrics={**TRAIN_METRICS, **entry.reply_metrics, **mode.reply_metrics},
                       status=mode.reply_status, client=dict(client or {}))


def decline_reply_schema(privacy_mode: str) -> ReplySchema | None:
    """A training reply that sends no update because the client's privacy budget is spent
    (None: the mode lets no client decline)."""
    mode = PRIVACY_MODES[privacy_mode]
    if not mode.declines:
        return None
    metrics = {k: v for k, v in TRAIN_METRICS.items() if k != TRAIN_LOSS}  # it took no step
    return ReplySchema(metrics={**metrics, **mode.reply_metrics}, status=True,
                       reason_required=True)


EVALUATE_REPLY_SCHEMA = ReplySchema(metrics=EVALUATE_METRICS)


def personal_reply_schema(personalised: bool, local_only: bool) -> ReplySchema:
    """A client's answer to ``PERSONAL_MESSAGE_TYPE``: its partition id and, for the global
    model, its personalised one (where the strategy makes one) and the model it trained alone
    (where asked), the local test examples and, with any, the accuracy and loss; metrics only."""
    models = [m for m, on in zip(PERSONAL_MODELS, (True, personalised, local_only),
                                 strict=True) if on]
    metrics = {PARTITION_ID: ReplyMetric(int, ge=0)}
    for model in models:
        metrics[personal_metric(model, "examples")] = ReplyMetric(int, ge=0)
        metrics[personal_metric(model, "accuracy")] = ReplyMetric(float, required=False, ge=0,
                                                                  le=1)
        metrics[personal_metric(model, "loss")] = ReplyMetric(float, required=False, ge=0,
                                                              le=MAX_LOSS)
    return ReplySchema(metrics=metrics)


def first_metric_record(message: Message) -> MetricRecord | None:
    """The first MetricRecord of a message, found without ``RecordDict.metric_records`` (which
    copies every record)."""
    return next((r for r in message.content.values() if isinstance(r, MetricRecord)), None)


def metric(message: Message, key: str) -> Any:
    """A value of the first MetricRecord (None when the key or the record is missing)."""
    record = first_metric_record(message)
    return None if record is None else record.get(key)


def message_round(content: RecordDict) -> int:
    """The server round a message belongs to: its config's ``SERVER_ROUND``, or a SecAgg+
    stage's ``SA_ROUND`` (0: neither)."""
    for record, key in ((CONFIG, SERVER_ROUND), (SECAGG, SA_ROUND)):
        if record in content and key in content[record]:
            return int(content[record][key])
    return 0


def message_dispatch(content: RecordDict) -> int | None:
    """The asynchronous training call a train message belongs to (None: a synchronous round's
    message, whose clients train once per round)."""
    if CONFIG in content and DISPATCH in content[CONFIG]:
        return int(content[CONFIG][DISPATCH])
    return None


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (their order kept)."""
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def npy_view(array: Array) -> np.ndarray:
    """The values an Array carries, read in place (no copy) with the ``.npy`` header
    ``numpy.load`` would read them with (``Array.numpy``); ValueError for anything else: no
    ``.npy`` header, another format version, or not exactly the header's number of bytes.
    Nothing is ever unpickled (an object dtype is returned as a dtype, never read)."""
    data = array.data
    buffer = io.BytesIO(data)
    version = npy_format.read_magic(buffer)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(buffer)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(buffer)
    else:
        raise ValueError(f".npy format {version[0]}.{version[1]} is not accepted")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects")
    count, offset = math.prod(shape), buffer.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} bytes of values, {dtype}{list(shape)} has "
                         f"{count * dtype.itemsize}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape, order="F" if fortran else "C")


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays (read with ``allow_pickle=False``)."""
    return {name: array.numpy() for name, array in record.items()}


def array_bytes(message: Message) -> int:
    """Serialised size of the arrays a message carries."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())
