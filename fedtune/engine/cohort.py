"""The cohort fast path: run a block of one round's clients in this process.

A phase of a round (train or evaluate) addresses a cohort of clients that all receive the same
records. The cohort is cut into blocks of consecutive clients (by client id) whose size depends
on the cohort's size alone (``block_size``), so the same config gives the same blocks whatever
the number of workers or the order in which they finish. For each client of a block,
``run_block`` calls the client wing's own ``train_client`` / ``evaluate_client`` (the code the
ClientApp runs), screens the update with the server's checks (``fedtune.server.screening``)
and, for strategies that opt into the summing aggregator (``fedtune.server.summing``), adds
``weight × update`` to the block's float64 sum in client order; otherwise it keeps each
accepted update in its client's report. The blocks' sums are added in block order by whoever
collects them (``add_blocks``), so a round's total does not depend on how the blocks were
spread over workers - a resumed run or another worker count gives the same bits. No Flower
message is built per client: the per-client overhead is a few copies of the model's travelling
tensors.

This is what pfl-research's workers do (Granqvist et al. 2024, "pfl-research: simulation
framework for accelerating research in Private Federated Learning"): one resident model, clients
trained in a tight loop, aggregation as they finish.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Array, Message, MessageType, RecordDict

from fedtune import protocol
from fedtune.client.app import TrainedClient, evaluate_client, train_client
from fedtune.client.attacking import (
    Group,
    GroupTrainer,
    Update,
    attacked_update,
    group_update,
    group_updates,
)
from fedtune.client.private_chunks import train_private_chunks
from fedtune.client.vectorised import (
    TrainedChunk,
    group_updates_together,
    one_at_a_time_because,
    train_chunks,
    vectorisable,
)
from fedtune.config import Config
from fedtune.engine.gpu_memory import explained
from fedtune.errors import one_line
from fedtune.server.grid import CohortResult, CohortSpec
from fedtune.server.guard import (
    absurd_bound,
    absurd_update,
    model_norm,
    update_norm,
)
from fedtune.server.reports import ClientReport
from fedtune.server.screening import (
    check_claims,
    check_kept,
    check_metric_rows,
    check_metric_values,
    check_update_arrays,
)
from fedtune.server.stacked_rows import StackedRow
from fedtune.server.summing import accumulate
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.state.store import ClientStateStore
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources, client_round_seeds

BLOCKS_PER_ROUND = 64  # a round's cohort is cut into at most this many blocks
VECTOR_BLOCK = 32  # clients trained together in a block, at least (engine.vectorise_clients)

TrainFunction = Callable[..., TrainedClient]  # ``fedtune.client.app.train_client``'s signature


def block_size(cohort: int, least: int = 1) -> int:
    """Clients per block for a cohort of ``cohort`` clients (the same for every runtime): at
    least ``least`` (``least_block``), and few enough for at most BLOCKS_PER_ROUND blocks."""
    return max(least, math.ceil(cohort / BLOCKS_PER_ROUND))


def least_block(config: Config) -> int:
    """The fewest clients in a block under ``config``: VECTOR_BLOCK when clients are trained
    together (the clients of a chunk come from one block, so a block must hold enough of them
    to gain from it), else 1 (so a run whose clients train one at a time adds its sums as it
    always did)."""
    return VECTOR_BLOCK if one_at_a_time_because(config) is None else 1


@dataclass
class BlockClient:
    """One client of a block: its node, its id, its Context.state as bytes
    (``fedtune.state.codec``: what travels to an actor, and what the store keeps), and its
    round seed where the cohort's were derived at once (``cohort_clients``)."""

    node_id: int
    client_id: int
    state: bytes | None  # None: empty so far, or not needed (an evaluation)
    seed: int | None = None  # fedtune.task.client_round_seed (None: derived where it trains)


@dataclass
class BlockTask:
    """A block of clients that receive the same content."""

    index: int  # the block's position in its round
    message_type: str
    clients: list[BlockClient]
    spec: CohortSpec


@dataclass
class BlockResult:
    """What a block returns: a report per client (an accepted update kept one by one is its
    report's ``update``), their states, and the block's sum."""

    index: int
    reports: list[ClientReport]
    # client id -> its state's bytes after training, for the clients whose state changed
    states: dict[int, bytes] = field(default_factory=dict)
    total: dict[str, np.ndarray] | None = None  # float64 sum of weight × update, client order
    weight: float = 0.0
    seconds: float = 0.0


def server_round_of(records: RecordDict) -> int:
    """The round a message's records say they belong to (0: none)."""
    return int(records[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))


@dataclass
class DecodedContent:
    """The records the block's clients receive, with every ArrayRecord decoded once."""

    records: RecordDict
    arrays: dict[str, dict[str, np.ndarray]]  # record name -> arrays
    _model_norm: float | None = None

    @classmethod
    def of(cls, records: RecordDict) -> DecodedContent:
        return cls(records, {name: protocol.to_numpy(record)
                             for name, record in records.array_records.items()})

    @property
    def server_round(self) -> int:
        return server_round_of(self.records)

    @property
    def model_norm(self) -> float:
        """‖w‖ of the model the clients receive (measured once)."""
        if self._model_norm is None:
            self._model_norm = model_norm(self.arrays[protocol.ARRAYS])
        return self._model_norm


class _ByteCounter:
    """What Flower's ``ArrayRecord.count_bytes`` says of records holding these arrays: each
    array's serialised size (measured once per shape and dtype: it does not depend on the
    values) plus the length of its name."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[tuple[int, ...], str], int] = {}

    def __call__(self, records: Mapping[str, Mapping[str, np.ndarray]]) -> int:
        total = 0
        for arrays in records.values():
            for name, value in arrays.items():
                signature = (value.shape, value.dtype.str)
                if signature not in self._sizes:
                    self._sizes[signature] = len(Array(np.zeros(value.shape, value.dtype)).data)
                total += self._sizes[signature] + len(name)
        return total


count_bytes = _ByteCounter()


class _BlockSums:
    """Float64 block sums for reuse. A fresh array of the model's size costs a page fault per
    4 KiB page when it is first written - more than a small client's whole step when blocks
    hold a client or two - so each process keeps the sums it has finished with and zeroes one
    again instead (``give_back``: when the blocks have been added up, or an actor's results
    have left it)."""

    KEPT = 8  # free sums kept per model layout

    def __init__(self) -> None:
        self._free: dict[tuple, list[dict[str, np.ndarray]]] = {}
        self._lent: dict[int, dict[str, np.ndarray]] = {}

    @staticmethod
    def _layout(arrays: Mapping[str, np.ndarray]) -> tuple:
        return tuple((name, value.shape) for name, value in arrays.items())

    def take(self, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zeros shaped as ``like``, in float64."""
        free = self._free.get(self._layout(like))
        if free:
            total = free.pop()
            for value in total.values():
                value.fill(0.0)
        else:
            total = {name: np.zeros(value.shape, np.float64) for name, value in like.items()}
        self._lent[id(total)] = total
        return total

    def give_back(self, total: dict[str, np.ndarray] | None) -> None:
        """``total`` may be reused (sums this process did not lend are left alone)."""
        if total is None or self._lent.pop(id(total), None) is not total:
            return
        free = self._free.setdefault(self._layout(total), [])
        if len(free) < self.KEPT:
            free.append(total)


block_sums = _BlockSums()


def _error_line(error: BaseException) -> str:
    error = explained(error)  # past an actor's GPU memory cap: one line that names it
    return one_line("".join(traceback.format_exception_only(type(error), error)))


def _screen_update(trained: TrainedClient, received: dict[str, dict[str, np.ndarray]],
                   content: DecodedContent, spec: CohortSpec, report: ClientReport
                   ) -> tuple[str, str]:
    """(status, reason) of a trained client's reply, by the run's exact reply schemas
    (``fedtune.server.screening``) and the guard's bound on an absurd update
    (``fedtune.server.guard``, which sets the report's ``update_norm``): ok, declined or
    rejected."""
    client_id = report.client_id
    limits = spec.limits
    if trained.arrays is None:
        if limits.decline is None:
            return "rejected", ("no update (no ArrayRecord), and the privacy mode lets no "
                                "client decline")
        problem = (check_metric_values(trained.metrics, limits.decline)
                   or check_claims(trained.metrics, limits, client_id, limits.train_sizes, 0))
        if not problem and not trained.status:
            problem = f"record {protocol.STATUS!r} gives no {protocol.REASON!r}"
        return ("rejected", problem) if problem else ("declined", trained.status)
    schema = limits.train
    problem = (_reply_structure(received, content, spec)
               or check_kept(content.arrays[protocol.ARRAYS], received[protocol.ARRAYS],
                             limits.kept))
    if problem:
        return "rejected", problem
    problem = (check_metric_values(trained.metrics, schema)
               or check_claims(trained.metrics, limits, client_id, limits.train_sizes, 1))
    if problem:
        return "rejected", problem
    report.update_norm = update_norm(content.arrays[protocol.ARRAYS], received[protocol.ARRAYS])
    problem = absurd_update(report.update_norm, content.model_norm)
    return ("rejected", problem) if problem else ("ok", "")


def _screen_evaluation(metrics: Mapping[str, Any], spec: CohortSpec, client_id: int) -> str | None:
    limits = spec.limits
    return (check_metric_values(metrics, limits.evaluate)
            or check_claims(metrics, limits, client_id, limits.test_sizes, 0))


def run_block(resources: TaskResources, content: DecodedContent, task: BlockTask,
              train: TrainFunction = train_client,
              client_limit_s: float = math.inf) -> BlockResult:
    """Train or evaluate every client of ``task`` on the resident model; see the module doc.

    ``train`` is ``fedtune.client.app.train_client`` (tests wrap it to inject faults); with
    ``engine.vectorise_clients``, clients it may train together (``fedtune.client.vectorised``)
    are. A client that trains for longer than ``client_limit_s`` is reported ``timeout`` and
    its update is dropped (the in-process engine runs clients one after another and bounds each
    one's own time, as if they ran side by side). A client's new state is returned unless it
    failed or timed out, as the runtimes keep it: the server never heard from such a client."""
    started = time.perf_counter()
    result = BlockResult(task.index, [])
    if task.message_type == MessageType.EVALUATE:
        _evaluate_block(resources, content, task, result)
    elif train is train_client and vectorisable(resources):
        plan = resources.attack
        on_data = plan.active and plan.entry.acts_on == "data"
        alone = [on_data and plan.attacks(c.client_id, content.server_round)
                 for c in task.clients]
        together = [c for c, own in zip(task.clients, alone, strict=True) if not own]
        if together:
            _train_together(resources, content, replace(task, clients=together), result,
                            client_limit_s)
        if len(together) < len(task.clients):  # a data attacker trains on its poisoned rows
            attackers = [c for c, own in zip(task.clients, alone, strict=True) if own]
            _train_one_at_a_time(resources, content, replace(task, clients=attackers), train,
                                 result, client_limit_s)
            order = {c.client_id: i for i, c in enumerate(task.clients)}
            result.reports.sort(key=lambda report: order[report.client_id])
    else:
        _train_one_at_a_time(resources, content, task, train, result, client_limit_s)
    result.seconds = time.perf_counter() - started
    return result


def _train_one_at_a_time(resources: TaskResources, content: DecodedContent, task: BlockTask,
                         train: TrainFunction, result: BlockResult,
                         client_limit_s: float) -> None:
    """The clients of a train block trained one after another by ``train``, each update
    screened and kept (``_keep_update``), each new state returned."""
    for client, state, trained, took in _trained(resources, content, task, train):
        report = ClientReport(client.node_id, client.client_id, "ok")
        result.reports.append(report)
        if isinstance(trained, Exception):
            report.status, report.reason = "failed", _error_line(trained)
            continue
        if took > client_limit_s:
            report.status = "timeout"
            report.reason = (f"no reply within strategy.round_timeout_s = "
                             f"{client_limit_s:g}s (the client took {took:.1f}s)")
            continue
        after = state_to_bytes(state)
        if after != (client.state or b""):
            result.states[client.client_id] = after
        _keep_update(result, report, trained, content, task.spec)


def _evaluate_block(resources: TaskResources, content: DecodedContent, task: BlockTask,
                    result: BlockResult) -> None:
    global_arrays = content.arrays[protocol.ARRAYS]
    for client in task.clients:
        report = ClientReport(client.node_id, client.client_id, "ok")
        result.reports.append(report)
        try:
            report.metrics = evaluate_client(resources, client.client_id, global_arrays)
        except Exception as error:  # noqa: BLE001 - a client's failure is its outcome
            report.status, report.reason = "failed", _error_line(error)
            continue
        problem = _screen_evaluation(report.metrics, task.spec, client.client_id)
        if problem:
            report.status, report.reason = "rejected", problem


TrainOutcome = tuple[BlockClient, RecordDict, "TrainedClient | Exception", float]


def _trained(resources: TaskResources, content: DecodedContent, task: BlockTask,
             train: TrainFunction) -> Iterator[TrainOutcome]:
    """Each client of a train block with its state, what its training gave (or raised) and
    how long it took, in client order, one client at a time."""
    global_arrays = content.arrays[protocol.ARRAYS]
    for client in task.clients:
        state = state_from_bytes(client.state) if client.state else RecordDict()
        client_started = time.perf_counter()
        try:
            trained = train(resources, client.client_id, content.server_round,
                            content.records, global_arrays, state)
        except Exception as error:  # noqa: BLE001 - a client's failure is its outcome
            trained = error
        yield client, state, trained, time.perf_counter() - client_started


def _train_together(resources: TaskResources, content: DecodedContent, task: BlockTask,
                    result: BlockResult, client_limit_s: float) -> None:
    """The clients of a train block trained together a chunk at a time
    (``fedtune.client.vectorised``; under local DP ``fedtune.client.private_chunks``), each
    chunk screened and summed as a whole (``_keep_chunk``); each client's new state returned as
    ``_train_one_at_a_time`` returns it (``_keep_states``)."""
    states = [client.state or b"" for client in task.clients]
    seeds = [client.seed for client in task.clients]
    trainer = train_private_chunks if _private(resources) else train_chunks
    # a cohort that keeps every update (no weighted mean) keeps each chunk's stack itself
    chunks = trainer(resources, content.server_round, content.records,
                     content.arrays[protocol.ARRAYS],
                     [client.client_id for client in task.clients], states,
                     None if None in seeds else seeds, keep_stacks=not task.spec.weighted_mean)
    done = 0
    while done < len(task.clients):
        try:
            chunk = next(chunks)
        except Exception as error:  # noqa: BLE001 - the clients' failure is their outcome
            for client in task.clients[done:]:
                result.reports.append(ClientReport(client.node_id, client.client_id, "failed",
                                                   _error_line(error)))
            return
        members = task.clients[done:done + len(chunk.trained)]
        _play_update_attacks(resources, content, members, chunk)
        _keep_chunk(result, members, chunk, content, task.spec, client_limit_s)
        if chunk.share <= client_limit_s:  # a timed-out client's state is dropped with it
            _keep_states(result, members, chunk.states)
        done += len(members)


def _keep_states(result: BlockResult, members: list[BlockClient], states: list[bytes]) -> None:
    """The states of a chunk's clients that changed while they trained (SCAFFOLD's control
    variates, FedDyn's gradients, FedPer's heads), into ``result``."""
    for client, after in zip(members, states, strict=True):
        if after != (client.state or b""):
            result.states[client.client_id] = after


def _play_update_attacks(resources: TaskResources, content: DecodedContent,
                         members: list[BlockClient], chunk: TrainedChunk) -> None:
    """An update attacker of the chunk trained honestly with the others; what it sends instead
    (``fedtune.client.attacking.attacked_update``, as ``train_client`` plays it) replaces its
    row of the chunk's stacked arrays, which its reply's arrays view."""
    plan = resources.attack
    if not plan.active or chunk.stacked is None:
        return
    global_arrays = content.arrays[protocol.ARRAYS]
    train_group = group_trainer(resources)
    for i, (client, trained) in enumerate(zip(members, chunk.trained, strict=True)):
        if trained.arrays is None or not plan.attacks(client.client_id, content.server_round):
            continue
        sent = attacked_update(resources, client.client_id, content.server_round,
                               content.records, global_arrays, trained.arrays, train_group)
        for name, value in sent.items():
            chunk.stacked[name][i] = value


def group_trainer(resources: TaskResources, train: TrainFunction = train_client) -> GroupTrainer:
    """How ``run_block`` (training clients with ``train``) trains a collusion group's honest
    updates: as chunks where its plain clients train together, else one at a time (as a
    strategy's own client side, ``train_client`` alone, or a privacy mode's mechanism trains
    them)."""
    plain = not STRATEGIES[resources.config.strategy.name].client
    together = (train is train_client and vectorisable(resources) and plain
                and not _private(resources))
    return group_updates_together if together else group_updates


def _private(resources: TaskResources) -> bool:
    """Whether the run's clients train under a privacy mode's mechanism (local DP-SGD)."""
    return bool(PRIVACY_MODES[resources.config.privacy.mode].mechanism)


def colluders_updates(resources: TaskResources, content: DecodedContent, groups: list[Group],
                      train: TrainFunction = train_client) -> dict[Group, Update]:
    """The updates the colluders of ``groups`` send in the train phase of ``content``, formed
    as ``run_block`` with ``train`` forms them (``fedtune.client.attacking.group_update``):
    what one Ray actor forms for the others (``fedtune.engine.colluders``)."""
    train_group = group_trainer(resources, train)
    return {group: group_update(resources, group, content.server_round, content.records,
                                content.arrays[protocol.ARRAYS], train_group)
            for group in groups}


def _keep_chunk(result: BlockResult, members: list[BlockClient], chunk: TrainedChunk,
                content: DecodedContent, spec: CohortSpec, client_limit_s: float) -> None:
    """``_keep_update`` for a chunk of clients trained together, per chunk where it can be:
    the reply's records, names, shapes and dtypes checked once (every client's arrays are rows
    of the same stacked arrays), every update's norm - and, for a weighted mean, the chunk's
    weighted sum - from one compiled read of each row (``fedtune.server.chunk_passes``: a
    non-finite value makes a norm non-finite, and that client goes through
    ``_screen_update``, which names the tensor), the metrics checked a metric at a time over
    the chunk (``check_metric_rows``), the bytes counted once; the chunk's sum is added to the
    block's where every client is accepted, else the accepted rows are summed again
    (``chunk_passes.accumulate_rows``: the same bits for the same rows), or the accepted
    updates are kept as rows of the chunk's stack, which the trainer handed over
    (``_train_together``'s keep_stacks): no copy."""
    from fedtune.server import chunk_passes  # numba's import (~0.3 s): chunked runs only
    reports = [ClientReport(c.node_id, c.client_id, "ok") for c in members]
    result.reports.extend(reports)
    if chunk.share > client_limit_s:
        for report in reports:
            report.status = "timeout"
            report.reason = (f"no reply within strategy.round_timeout_s = "
                             f"{client_limit_s:g}s (the client took {chunk.share:.1f}s)")
        return
    global_arrays = content.arrays[protocol.ARRAYS]
    stacked = chunk.stacked
    norms, chunk_sum, chunk_problem, chunk_bytes = None, None, "?", 0
    if stacked is not None:
        first = {name: value[0] for name, value in stacked.items()}
        chunk_problem = _reply_structure({protocol.ARRAYS: first}, content, spec)
        if not chunk_problem:  # else each client is screened alone below
            bound = absurd_bound(content.model_norm)
            weights = _chunk_weights(chunk) if spec.weighted_mean else None
            if weights is None:
                norms = chunk_passes.update_norms(global_arrays, stacked, bound)
            else:
                norms, chunk_sum = chunk_passes.update_norms_and_sum(global_arrays, stacked,
                                                                     weights, bound)
        chunk_bytes = count_bytes({protocol.ARRAYS: first})
    limits = spec.limits
    finite = np.isfinite(norms) if norms is not None else None
    metric_problems = check_metric_rows([trained.metrics for trained in chunk.trained],
                                        limits.train)
    for i, (report, trained) in enumerate(zip(reports, chunk.trained, strict=True)):
        report.metrics = trained.metrics
        if (trained.arrays is None or chunk_problem or trained.records
                or not finite[i]):
            received = {} if trained.arrays is None else _received(trained)
            if received:
                report.bytes_up = count_bytes(received)
            report.status, report.reason = _screen_update(trained, received, content, spec,
                                                          report)
            continue
        report.bytes_up = chunk_bytes
        problem = (check_kept(global_arrays, trained.arrays, limits.kept)
                   or metric_problems[i]
                   or check_claims(trained.metrics, limits, report.client_id,
                                   limits.train_sizes, 1))
        if not problem:
            report.update_norm = float(norms[i])
            problem = absurd_update(report.update_norm, content.model_norm)
        if problem:
            report.status, report.reason = "rejected", problem
    accepted = np.array([i for i, r in enumerate(reports) if r.status == "ok"], dtype=np.int64)
    if not len(accepted):
        return
    everyone = len(accepted) == len(reports)
    if spec.weighted_mean:
        rows = stacked if everyone else {name: value[accepted] for name, value in stacked.items()}
        weights = np.array([float(reports[i].metrics[protocol.NUM_EXAMPLES])
                            for i in accepted])
        if result.total is None:
            result.total = block_sums.take(global_arrays)
        if everyone and chunk_sum is not None:
            for name, value in chunk_sum.items():
                result.total[name] += value
        else:
            chunk_passes.accumulate_rows(result.total, rows, weights)
        result.weight += float(weights.sum())
    else:  # the chunk's stack, the cohort's to keep (``_train_together``'s keep_stacks)
        for i in accepted.tolist():
            reports[i].update = {**_received(chunk.trained[i]),
                                 protocol.ARRAYS: StackedRow(stacked, i)}


def _chunk_weights(chunk: TrainedChunk) -> np.ndarray | None:
    """Each client's ``num-examples`` as a float64 weight, or None where one is missing or not
    a number (screening says why; the accepted rows are summed after it)."""
    try:
        return np.array([float(trained.metrics[protocol.NUM_EXAMPLES])
                         for trained in chunk.trained])
    except (KeyError, TypeError, ValueError):
        return None


def _received(trained: TrainedClient) -> dict[str, dict[str, np.ndarray]]:
    """A trained client's reply arrays by record: its model, and its client side's records."""
    return {protocol.ARRAYS: trained.arrays,
            **{name: protocol.to_numpy(r) for name, r in trained.records.items()}}


def _reply_structure(received: dict[str, dict[str, np.ndarray]], content: DecodedContent,
                     spec: CohortSpec) -> str | None:
    """What is wrong with a reply's records, names, shapes, dtypes (and its values' finiteness:
    ``check_update_arrays``), or None."""
    schema = spec.limits.train
    if received.keys() != schema.arrays.keys():
        return f"array records {sorted(received)} instead of {sorted(schema.arrays)}"
    for record_name, arrays in received.items():
        answered = schema.arrays[record_name]
        if answered not in content.arrays:
            return f"array record {answered!r} was not sent"
        problem = check_update_arrays(content.arrays[answered], arrays, record_name)
        if problem:
            return problem
    return None


def _keep_update(result: BlockResult, report: ClientReport, trained: TrainedClient,
                 content: DecodedContent, spec: CohortSpec) -> None:
    """Screen a trained client's reply into ``report``; add an accepted update to the block's
    sum (weighted-mean strategies) or keep a copy of it."""
    received: dict[str, dict[str, np.ndarray]] = {}
    if trained.arrays is not None:
        received = _received(trained)
        report.bytes_up = count_bytes(received)
    report.metrics = trained.metrics
    report.status, report.reason = _screen_update(trained, received, content, spec, report)
    if report.status != "ok":
        return
    if spec.weighted_mean:
        weight = float(trained.metrics[protocol.NUM_EXAMPLES])
        if result.total is None:
            result.total = block_sums.take(received[protocol.ARRAYS])
        accumulate(result.total, received[protocol.ARRAYS], weight)
        result.weight += weight
    else:  # kept past the next client, who overwrites the resident model
        received[protocol.ARRAYS] = {name: np.array(value)
                                     for name, value in received[protocol.ARRAYS].items()}
        report.update = received


def _add_block_sum(total: dict[str, np.ndarray] | None,
                   block: BlockResult) -> dict[str, np.ndarray]:
    """``total + block.total`` (in place; a copy of the block's sum when there is no total
    yet): the one order in which block sums are added, so every way of combining them gives
    the same bits. The block's sum then goes back to ``block_sums`` and leaves the block."""
    more = block.total
    if total is None:
        total = {name: value.copy() for name, value in more.items()}
    else:
        for name, value in more.items():
            total[name] += value
    block_sums.give_back(more)
    block.total = None
    return total


class BlockAdder:
    """A phase's result from its blocks, which may come in any order: each block is added as
    soon as every block before it is in, so the sum has the same bits whichever worker ran
    which block; reports sorted by client id. It takes over the blocks' sums: once added, a
    sum goes back to ``block_sums`` for reuse and leaves its block (``total`` is None)."""

    def __init__(self) -> None:
        self._cohort = CohortResult(reports=[])
        self._waiting: dict[int, BlockResult] = {}
        self._next = 0

    def add(self, block: BlockResult) -> None:
        self._waiting[block.index] = block
        while self._next in self._waiting:
            self._add_next(self._waiting.pop(self._next))
            self._next += 1

    def _add_next(self, block: BlockResult) -> None:
        cohort = self._cohort
        cohort.reports.extend(block.reports)
        if block.total is not None:
            cohort.total = _add_block_sum(cohort.total, block)
            cohort.total_weight += block.weight

    def result(self) -> CohortResult:
        if self._waiting:
            raise ValueError(f"blocks {sorted(self._waiting)} came without block {self._next}")
        self._cohort.reports.sort(key=lambda r: r.client_id)
        return self._cohort


def add_blocks(blocks: list[BlockResult]) -> CohortResult:
    """A phase's result from all its blocks (``BlockAdder``)."""
    adder = BlockAdder()
    for block in blocks:
        adder.add(block)
    return adder.result()


def split_block(task: BlockTask) -> list[BlockTask]:
    """A block as one block per client (to run each alone after its worker died); their
    ``join_singletons`` gives the block's sum with the same bits."""
    return [BlockTask(task.index, task.message_type, [client], task.spec)
            for client in task.clients]


def join_singletons(index: int, parts: list[BlockResult]) -> BlockResult:
    """The result of block ``index`` from the one-client blocks it was split into (in client
    order): the sum is added up in the same order as ``run_block`` would have."""
    joined = BlockResult(index, [])
    for part in parts:
        joined.reports.extend(part.reports)
        joined.states.update(part.states)
        joined.seconds += part.seconds
        if part.total is None:
            continue
        joined.total = _add_block_sum(joined.total, part)
        joined.weight += part.weight
    return joined


def cohort_clients(messages: list[Message], node_to_client: Mapping[int, int],
                   store: ClientStateStore, run_seed: int | None = None) -> list[BlockClient]:
    """The clients ``messages`` address, each with its state from ``store`` when they train
    (an evaluation uses none; one that evaluates a personal model passes it here) and, given
    the run's seed, its round seed: ``client_round_seeds`` over the whole cohort in one call
    (~0.1 ms a call, which a call per chunk of 32 clients paid ~3 us a client for)."""
    with_state = messages[0].metadata.message_type == MessageType.TRAIN
    clients = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in node_to_client:
            raise ValueError(f"no node {node} in this grid")
        client = node_to_client[node]
        clients.append(BlockClient(node, client, store.get_bytes(client) if with_state else None))
    if with_state and run_seed is not None and clients:
        content = messages[0].content  # a cohort's messages share one content
        seeds = client_round_seeds(run_seed, server_round_of(content),
                                   [c.client_id for c in clients],
                                   protocol.message_dispatch(content))
        for client, seed in zip(clients, seeds, strict=True):
            client.seed = seed
    return clients


def cohort_blocks(clients: list[BlockClient], message_type: str, spec: CohortSpec,
                  least: int = 1) -> list[BlockTask]:
    """The blocks of a cohort, clients in client-id order, at least ``least`` per block
    (``least_block``)."""
    ordered = sorted(clients, key=lambda c: c.client_id)
    size = block_size(len(ordered), least)
    return [BlockTask(index, message_type, ordered[start:start + size], spec)
            for index, start in enumerate(range(0, len(ordered), size))]
