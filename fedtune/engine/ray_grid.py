"""fedtune's fast engine: a Flower ``Grid`` whose nodes are virtual clients that a pool of
long-lived Ray actors serves.

Flower's simulation starts a ClientApp for every message and rebuilds its model and data each
time. Here each actor (``ClientWorker``) loads data and one model once and then serves many
clients per round, like pfl-research's workers (Granqvist et al. 2024, "pfl-research:
simulation framework for accelerating research in Private Federated Learning").

Two kinds of work go to the actors:

- **Blocks** (``run_cohort``, the round's train and evaluate phases): the cohort is cut into at
  most 64 blocks of consecutive clients (``fedtune.engine.cohort``); the phase's shared records
  go into Ray's object store once; each block is one Ray call that trains its clients with the
  client wing's own functions and returns per-client reports plus either the block's weighted
  sum of screened updates or the updates themselves. The driver adds block sums in block order,
  so the result does not depend on which actor ran which block. Under an attack whose
  colluders see their group's honest updates, one actor forms each group's update for all
  (``fedtune.engine.colluders``).
- **Messages** (``push_messages`` / ``pull_messages``, anything else a strategy sends): batches
  of about ``BATCH_S`` seconds of single-message work through the ClientApp.

A cohort so small that Ray's fixed cost per phase (putting the records, a call per actor,
collecting the results: about ``RAY_PHASE_S``) exceeds what spreading its clients over the
actors saves runs its blocks in the driver instead, with the actors' thread count and the same
blocks, so the same bits (``_in_driver``; only for fedtune's own client code on CPU, once the
time of a client is known from an earlier phase).

Each actor is kept ``CALLS_PER_ACTOR`` calls ahead, so it never waits for the driver, and a
slower actor takes fewer calls. The driver waits on Ray (``ray.wait``), never sleeps or polls.

Client state. The driver keeps each client's ``Context.state`` between rounds, in a
``ClientStateStore`` (``fedtune.state.store``: bytes in memory up to
``engine.client_state_memory_mb``, the rest on disk), and ships it as bytes with the work; the
state that comes back replaces it unless the client failed. State therefore survives a dead
actor, and any actor can serve any client.

Faults. A client that raises is reported failed (an error reply, or a ``failed`` report). When an
actor dies, a new one takes its place and its unfinished work is queued again; the work of the
call it died in is split up and each client runs alone: one per call, on an actor with nothing
else to do (a dying process can also lose the result of the call before, so only a lone client
is known to be the one it died on). A lone client whose actor dies is reported failed
(``ErrorCode.CLIENT_APP_CRASHED``). A call still running ``engine.client_timeout_s`` after it
should have finished has its actor killed and replaced in the same way; a lone client that
overruns is reported as a timeout (``ErrorCode.REPLY_MESSAGE_UNAVAILABLE``, what a SuperLink
answers for an expired reply). A block split into lone clients is put back together in client
order, so its sum has the bits it would have had. A replacement actor that cannot start retires
its slot; with no actor left every queued piece of work fails, so the server never waits for
nothing.
"""

from __future__ import annotations

import importlib
import math
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import ray
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run

from fedtune.attacks.plan import AttackPlan
from fedtune.engine.cohort import (
    BlockAdder,
    BlockClient,
    BlockResult,
    BlockTask,
    DecodedContent,
    cohort_blocks,
    cohort_clients,
    join_singletons,
    least_block,
    run_block,
    split_block,
)
from fedtune.engine.colluders import Forming, colluding_groups, start_forming
from fedtune.engine.inprocess import NODE_ID_OFFSET, act_as_server, error_reply
from fedtune.engine.ray_pool import ActorFactory, stop_actors
from fedtune.engine.ray_worker import ClientOutcome, ClientTask
from fedtune.protocol import (
    INSECURE_NOISE_ALLOWED,
    INSECURE_NOISE_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
)
from fedtune.server.exchange import RunStopped
from fedtune.server.grid import CohortGrid, CohortResult, CohortSpec, NodeRange
from fedtune.server.reports import ClientReport
from fedtune.state.store import ClientStateStore
from fedtune.task import parsed_run_config, run_config_resources

BATCH_S = 0.05  # single-message work per Ray call, once the time of a message is known
COHORT_CALL_S = 0.25  # most client time per Ray call of blocks (calls shrink as a phase ends)
MAX_BATCH = 64
CALLS_PER_ACTOR = 2
WAIT_S = 0.25  # longest single wait on Ray before checking timeouts and the stop event
PUSHED_KEPT = 4  # shared records whose object-store copy later pushes reuse
# Ray's own cost of one phase on the actors, measured on 2 cores (BENCHMARKS.md: 100 clients,
# about 0.25 s a round more than the same blocks in one process)
RAY_PHASE_S = 0.2


def prepare_driver(factory: ActorFactory) -> None:
    """What a phase run in the driver needs, loaded while the actors start: the resident
    resources of the clients' run config, and torch._dynamo (torch's optimizers import it on
    first use, which takes seconds)."""
    if factory.train is not None or factory.client_gpus > 0:
        return  # phases never run in the driver (``RayGrid._in_driver``)
    _ = run_config_resources(factory.run_config).model
    importlib.import_module("torch._dynamo")


@dataclass
class _Work:
    """A unit of work for one Ray call: single messages, or consecutive blocks of a cohort."""

    message_ids: list[str] = field(default_factory=list)
    blocks: list[BlockTask] = field(default_factory=list)
    cohort: _Cohort | None = None  # the phase the blocks belong to
    alone: bool = False  # its previous call's actor died or overran: it runs alone
    done: bool = False  # delivered, or discarded (a late result is dropped)

    @property
    def size(self) -> int:
        if self.blocks:
            return sum(len(block.clients) for block in self.blocks)
        return len(self.message_ids)


@dataclass
class _Call:
    """A call in an actor's queue."""

    ref: ray.ObjectRef
    work: _Work
    expected_s: float = 0.0  # how long it should take


@dataclass
class _Lane:
    """One actor slot: the actor and its calls in the order it runs them."""

    actor: ray.actor.ActorHandle
    starting: ray.ObjectRef | None  # ready() while the actor loads data and model
    started_at: float
    calls: deque[_Call] = field(default_factory=deque)
    busy_since: float = 0.0  # when the first call in ``calls`` started (as the driver saw it)
    retired: bool = False


@dataclass
class _Cohort:
    """One ``run_cohort`` call in progress."""

    content: ray.ObjectRef
    total_blocks: int
    total_clients: int
    results: dict[int, BlockResult] = field(default_factory=dict)  # by block index
    adder: BlockAdder = field(default_factory=BlockAdder)  # their sum, in block order
    parts: dict[int, dict[int, BlockResult]] = field(default_factory=dict)  # split blocks
    split_sizes: dict[int, int] = field(default_factory=dict)
    works: list[_Work] = field(default_factory=list)
    clients_done: int = 0
    forming: list[Forming] = field(default_factory=list)  # collusion groups' updates, formed once

    def deliver(self, block: BlockTask, result: BlockResult) -> None:
        index = block.index
        self.clients_done += len(result.reports)
        if index not in self.split_sizes:
            self.complete_block(result)
            return
        position = block.clients[0].client_id
        self.parts.setdefault(index, {})[position] = result
        if len(self.parts[index]) == self.split_sizes[index]:
            ordered = [self.parts[index][key] for key in sorted(self.parts[index])]
            self.complete_block(join_singletons(index, ordered))

    def complete_block(self, result: BlockResult) -> None:
        self.results[result.index] = result
        self.adder.add(result)

    @property
    def complete(self) -> bool:
        return len(self.results) == self.total_blocks


class RayGrid(CohortGrid):
    """A Grid of ``num_clients`` virtual clients served by long-lived Ray actors."""

    def __init__(self, factory: ActorFactory, actors: list[ray.actor.ActorHandle],
                 num_clients: int, client_timeout_s: float, start_timeout_s: float) -> None:
        self._factory = factory
        self._run = Run.create_empty(factory.run_id)
        act_as_server(factory.run_id)
        self._num_clients = num_clients
        # a simulation's clients accept the reproducible (not private) noise the run asks for
        self._insecure_noise = ({INSECURE_NOISE_ALLOWED: True}
                                if factory.run_config.get(INSECURE_NOISE_KEY) is True else {})
        self._client_timeout_s = client_timeout_s
        self._start_timeout_s = start_timeout_s
        now = time.monotonic()
        self._lanes = [_Lane(actor, None, now) for actor in actors]
        self._queue: deque[_Work] = deque()
        self._jobs: dict[str, tuple[Message, ClientTask]] = {}  # pushed, no reply yet
        self._replies: dict[str, Message] = {}
        self._pushed: dict[int, tuple[object, ray.ObjectRef]] = {}
        self._task_s: dict[str, float] = {}  # running mean of one client's time, by kind
        # one client's time in the last phase of each kind: the median over its blocks (an
        # actor's first block also pays for warming up, which the running mean remembers)
        self._phase_client_s: dict[str, float] = {}
        self._retired_reason = ""
        self.client_states = ClientStateStore.for_config(
            parsed_run_config(factory.run_config))
        self.node_to_client = NodeRange(NODE_ID_OFFSET, num_clients)
        self.restarts = 0  # actors replaced after dying or overrunning
        self._attack: AttackPlan | None = None  # the run's, once a phase has asked

    # --- Grid: single messages ---

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self._num_clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node = self._node(message)
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as a SuperLink assigns it
            arrays, rest = {}, RecordDict()
            for key, record in message.content.items():
                if isinstance(record, ArrayRecord):
                    arrays[key] = self._put(record)
                else:
                    rest[key] = record
            task = ClientTask(metadata=message.metadata, content=rest, arrays=arrays,
                              order=tuple(message.content.keys()),
                              node_config={PARTITION_ID: self.node_to_client[node],
                                           NUM_PARTITIONS: self._num_clients,
                                           **self._insecure_noise},
                              state=self.client_states.get_bytes(self.node_to_client[node]))
            self._jobs[message_id] = (message, task)
            ids.append(message_id)
        self._queue.extend(_Work(message_ids=[i]) for i in ids)
        self._pump(wait_s=0)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that are in for ``message_ids`` (waiting up to WAIT_S for one)."""
        wanted = list(message_ids)
        if not any(i in self._replies for i in wanted):
            self._pump(wait_s=WAIT_S)
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        self.discard(pending)
        return replies

    def discard(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            self._jobs.pop(message_id, None)
            self._replies.pop(message_id, None)

    # --- CohortGrid: a round's phase at once ---

    def run_cohort(self, messages: list[Message], spec: CohortSpec, timeout_s: float,
                   progress: Callable[[int, int], None] | None = None,
                   stop: threading.Event | None = None) -> CohortResult:
        content = messages[0].content
        kind = messages[0].metadata.message_type
        config = parsed_run_config(self._factory.run_config)
        clients = cohort_clients(messages, self.node_to_client, self.client_states,
                                 config.run.seed)
        blocks = cohort_blocks(clients, kind, spec, least_block(config))
        if self._in_driver(kind, len(clients)):
            return self._run_in_driver(content, blocks, timeout_s, progress, stop)
        cohort = _Cohort(self._put(content), len(blocks), len(clients))
        cohort.forming = self._start_forming(cohort.content, clients, kind, content)
        cohort.works = [_Work(blocks=[block], cohort=cohort) for block in blocks]
        self._queue.extend(cohort.works)
        deadline = time.monotonic() + timeout_s
        done = 0
        while not cohort.complete:
            if stop is not None and stop.is_set():
                self._drop(cohort)
                raise RunStopped(f"stopped while {cohort.total_clients - cohort.clients_done} "
                                 "clients were training")
            left = deadline - time.monotonic()
            if left <= 0:
                self._time_out(cohort, "no reply within strategy.round_timeout_s")
                break
            self._pump(wait_s=min(WAIT_S, left))
            if progress is not None and cohort.clients_done != done:
                done = cohort.clients_done
                progress(done, cohort.total_clients)
        for block in cohort.results.values():
            for client, state in block.states.items():
                self.client_states.put_bytes(client, state)
        self._note_phase(kind, list(cohort.results.values()))
        return cohort.adder.result()

    def _start_forming(self, ref: ray.ObjectRef, clients: list[BlockClient], kind: str,
                       content: RecordDict) -> list[Forming]:
        """Have the collusion groups of this phase's attackers formed once, by the least busy
        started actors, before their blocks (``fedtune.engine.colluders``)."""
        if self._attack is None:
            self._attack = AttackPlan.from_config(parsed_run_config(self._factory.run_config))
        groups = colluding_groups(self._attack, clients, kind, content)
        if not groups:
            return []
        lanes = sorted((lane for lane in self._lanes
                        if not lane.retired and lane.starting is None),
                       key=lambda lane: len(lane.calls))
        return start_forming([lane.actor for lane in lanes], ref, groups)

    def _note_phase(self, kind: str, results: list[BlockResult]) -> None:
        """Remember one client's time in this phase (the median over its blocks)."""
        timed = [r.seconds / len(r.reports) for r in results if r.reports]
        if timed:
            self._phase_client_s[kind] = statistics.median(timed)

    def _in_driver(self, kind: str, clients: int) -> bool:
        """Whether a phase of ``clients`` clients is cheaper here than on the actors: its
        client time (known from an earlier phase) saves less than Ray's cost of a phase when
        spread over the actors."""
        client_s = self._phase_client_s.get(kind)
        actors = self.actor_count
        if (client_s is None or actors == 0 or self._factory.train is not None
                or self._factory.client_gpus > 0):
            return False
        return client_s * clients * (1 - 1 / actors) < RAY_PHASE_S

    def _run_in_driver(self, content: RecordDict, blocks: list[BlockTask], timeout_s: float,
                       progress: Callable[[int, int], None] | None,
                       stop: threading.Event | None = None) -> CohortResult:
        """The phase's blocks in this process, in order, with the actors' torch threads (the
        driver's for its whole life: ``fedtune.task.process_threads``). A client over
        ``timeout_s`` is reported as a timeout, as in process; ``stop`` set ends the phase
        between blocks with ``RunStopped``."""
        resources = run_config_resources(self._factory.run_config)
        decoded = DecodedContent.of(content)
        adder, results, done = BlockAdder(), [], 0
        total = sum(len(b.clients) for b in blocks)
        for block in blocks:
            if stop is not None and stop.is_set():
                raise RunStopped(f"stopped with {total - done} clients to go")
            result = run_block(resources, decoded, block, client_limit_s=timeout_s)
            results.append(result)
            adder.add(result)  # its sum is free for the next block's at once
            for client, state in result.states.items():
                self.client_states.put_bytes(client, state)
            done += len(block.clients)
            if progress is not None:
                progress(done, total)
        self._note_phase(blocks[0].message_type, results)
        return adder.result()

    def close(self) -> None:
        """Kill every actor now (the end of the Ray session would too, later)."""
        stop_actors([lane.actor for lane in self._lanes])
        self._lanes = []

    @property
    def actor_count(self) -> int:
        return sum(1 for lane in self._lanes if not lane.retired)

    # --- dispatch ---

    def _node(self, message: Message) -> int:
        node = message.metadata.dst_node_id
        if node not in self.node_to_client:
            raise ValueError(f"no node {node} in this grid")
        return node

    def _put(self, value: object) -> ray.ObjectRef:
        """The object-store copy of ``value``: one put however many messages carry it."""
        key = id(value)  # the entry holds ``value``, so its id cannot be reused meanwhile
        if key not in self._pushed:
            self._pushed[key] = (value, ray.put(value))
            while len(self._pushed) > PUSHED_KEPT:
                self._pushed.pop(next(iter(self._pushed)))
        return self._pushed[key][1]

    def _pump(self, wait_s: float) -> None:
        """Collect finished calls, stop overrunning actors, hand out work."""
        self._dispatch()
        waiting = [lane.starting for lane in self._lanes if lane.starting is not None]
        waiting += [call.ref for lane in self._lanes for call in lane.calls]
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            done = set(ready)
            for lane in self._lanes:
                self._collect(lane, done)
        self._stop_overruns()
        self._dispatch()

    def _dispatch(self) -> None:
        lanes = [lane for lane in self._lanes if not lane.retired and lane.starting is None
                 and not any(call.work.alone for call in lane.calls)]
        while lanes:
            while self._queue and self._queue[0].done:
                self._queue.popleft()
            if not self._queue:
                break
            alone = self._queue[0].alone
            lane = min(lanes, key=lambda candidate: len(candidate.calls))
            if len(lane.calls) >= (1 if alone else CALLS_PER_ACTOR):
                break
            work = self._next_work(len(lanes))
            self._call(lane, work)
            if alone:
                lanes.remove(lane)
        if not any(not lane.retired for lane in self._lanes):
            self._fail_queue("no Ray actor is left to run it")

    def _next_work(self, num_lanes: int) -> _Work:
        """The next queued work, joined with the queued work of its kind behind it into one
        call of at most BATCH_S (messages) or COHORT_CALL_S (blocks) of client time, once that
        time is known, and no more than a fair share of what is queued, so calls shrink as a
        phase ends and the actors finish together (guided self-scheduling): a Ray call costs a
        few milliseconds, a small client's step less. Blocks keep their own results, so how they
        are grouped changes nothing."""
        work = self._queue.popleft()
        if work.alone:
            return work
        kind = work.blocks[0].message_type if work.blocks else "message"
        client_s = self._task_s.get(kind)
        call_s = COHORT_CALL_S if work.blocks else BATCH_S
        wanted = 1 if client_s is None else max(1, int(call_s / max(client_s, 1e-6)))
        queued = work.size + (sum(w.size for w in self._queue if not w.done) if work.blocks
                              else len(self._queue))
        limit = max(1, min(wanted, math.ceil(queued / (num_lanes * CALLS_PER_ACTOR))))
        while self._queue and work.size < limit and len(work.message_ids) < MAX_BATCH:
            after = self._queue[0]
            if after.done:
                self._queue.popleft()
                continue
            if after.alone or after.cohort is not work.cohort or (
                    bool(after.blocks) != bool(work.blocks)):
                break
            self._queue.popleft()
            work.blocks += after.blocks
            work.message_ids += after.message_ids
        return work

    def _call(self, lane: _Lane, work: _Work) -> None:
        if work.blocks:
            ref = lane.actor.run_blocks.remote((work.cohort.content,), work.blocks,
                                               work.cohort.forming)
            kind = work.blocks[0].message_type
        else:
            work.message_ids = [i for i in work.message_ids if i in self._jobs]  # not discarded
            if not work.message_ids:
                work.done = True
                return
            ref = lane.actor.serve.remote([self._jobs[i][1] for i in work.message_ids])
            kind = "message"
        if not lane.calls:
            lane.busy_since = time.monotonic()
        lane.calls.append(_Call(ref, work, work.size * self._task_s.get(kind, 0.0)))

    def _collect(self, lane: _Lane, done: set[ray.ObjectRef]) -> None:
        if lane.starting is not None and lane.starting in done:
            try:
                ray.get(lane.starting)
                lane.starting = None
            except ray.exceptions.RayError as error:
                self._retire(lane, error)
                return
        while lane.calls and lane.calls[0].ref in done:
            call = lane.calls.popleft()
            try:
                result = ray.get(call.ref)
            except ray.exceptions.RayTaskError as error:  # engine code raised; the actor lives
                result = error
            except ray.exceptions.RayError as error:  # the actor died
                reason = f"the client's Ray actor died ({type(error).__name__})"
                self._lose(lane, call, ErrorCode.CLIENT_APP_CRASHED, reason)
                return
            lane.busy_since = time.monotonic()
            self._finish(call.work, result)

    def _finish(self, work: _Work, result: object) -> None:
        """Deliver a call's result (or the error its engine code raised)."""
        if work.done:
            return
        work.done = True
        if work.blocks:
            if isinstance(result, Exception):
                result = [self._failed_block(block, f"engine error: {result}")
                          for block in work.blocks]
            else:
                self._learn(work.blocks[0].message_type, sum(r.seconds for r in result),
                            work.size)
            for block, block_result in zip(work.blocks, result, strict=True):
                work.cohort.deliver(block, block_result)
            return
        if isinstance(result, Exception):
            for message_id in work.message_ids:
                if message_id in self._jobs:
                    self._deliver(message_id, ClientOutcome(
                        error_reply(self._jobs[message_id][0], result), None, 0.0))
            return
        for message_id, outcome in zip(work.message_ids, result, strict=True):
            self._learn("message", outcome.seconds, 1)
            self._deliver(message_id, outcome)

    def _learn(self, kind: str, seconds: float, clients: int) -> None:
        per_client = seconds / max(clients, 1)
        previous = self._task_s.get(kind, per_client)
        self._task_s[kind] = 0.8 * previous + 0.2 * per_client

    def _deliver(self, message_id: str, outcome: ClientOutcome) -> None:
        job = self._jobs.pop(message_id, None)
        if job is None:  # discarded meanwhile
            return
        message, _ = job
        if outcome.state is not None and not outcome.reply.has_error():
            self.client_states.put_bytes(self.node_to_client[message.metadata.dst_node_id],
                                         outcome.state)
        self._replies[message_id] = outcome.reply

    @staticmethod
    def _failed_block(block: BlockTask, reason: str, status: str = "failed") -> BlockResult:
        return BlockResult(block.index, [ClientReport(c.node_id, c.client_id, status, reason)
                                         for c in block.clients])

    def _stop_overruns(self) -> None:
        now = time.monotonic()
        for lane in self._lanes:
            if lane.retired:
                continue
            if lane.starting is not None:
                if now - lane.started_at > self._start_timeout_s:
                    self._retire(lane, TimeoutError(
                        f"a new actor did not start within {self._start_timeout_s:g}s"))
            elif lane.calls:
                call = lane.calls[0]
                if now - lane.busy_since > self._client_timeout_s + call.expected_s:
                    lane.calls.popleft()
                    reason = (f"no reply within engine.client_timeout_s = "
                              f"{self._client_timeout_s:g}s")
                    self._lose(lane, call, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason)

    def _lose(self, lane: _Lane, culprit: _Call, code: int, reason: str) -> None:
        """The lane's actor died (or overran) during ``culprit``: a lone client there fails,
        the other clients of that call run again alone; the lane's other calls run again."""
        again: list[_Work] = []
        work = culprit.work
        if work.alone:
            self._fail(work, code, reason)
        elif not work.done:
            work.done = True  # replaced by the lone pieces below
            for block in work.blocks:
                pieces = split_block(block)
                work.cohort.split_sizes[block.index] = len(pieces)
                again += [_Work(blocks=[piece], cohort=work.cohort, alone=True)
                          for piece in pieces]
            again += [_Work(message_ids=[i], alone=True) for i in work.message_ids]
        for call in lane.calls:
            if not call.work.done:
                call.work.done = True
                again.append(_Work(call.work.message_ids, call.work.blocks, call.work.cohort,
                                   call.work.alone))
        self._queue.extendleft(reversed(again))
        ray.kill(lane.actor, no_restart=True)  # dead already, or stuck: make sure
        lane.calls.clear()
        lane.actor, lane.starting = self._factory.start()
        lane.started_at = time.monotonic()
        self.restarts += 1

    def _fail(self, work: _Work, code: int, reason: str) -> None:
        """A lone piece of work lost its actor: its client failed (or timed out)."""
        if work.done:
            return
        work.done = True
        if work.blocks:
            status = "timeout" if code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE else "failed"
            for block in work.blocks:
                work.cohort.deliver(block, self._failed_block(block, reason, status))
            return
        for message_id in work.message_ids:
            if message_id in self._jobs:
                error = Message(Error(code=code, reason=reason),
                                reply_to=self._jobs[message_id][0])
                self._deliver(message_id, ClientOutcome(error, None, 0.0))

    def _retire(self, lane: _Lane, error: BaseException) -> None:
        """A replacement actor could not start: its slot stays empty for the rest of the run."""
        lane.retired = True
        lane.starting = None
        self._retired_reason = f"{type(error).__name__}: {error}"
        ray.kill(lane.actor, no_restart=True)

    def _fail_queue(self, reason: str) -> None:
        while self._queue:
            self._fail(self._queue.popleft(), ErrorCode.CLIENT_APP_CRASHED,
                       f"{reason}: {self._retired_reason}")

    def _drop(self, cohort: _Cohort) -> None:
        """Forget a cohort's unfinished work (its late results are dropped)."""
        for work in cohort.works:
            work.done = True
        self._queue = deque(w for w in self._queue if w.cohort is not cohort)

    def _time_out(self, cohort: _Cohort, reason: str) -> None:
        """Report the clients of every unfinished block as timed out."""
        finished = set(cohort.results)
        for work in cohort.works:
            (block,) = work.blocks  # the cohort's original works hold one block each
            if block.index not in finished:
                cohort.complete_block(self._failed_block(block, reason, "timeout"))
        for work in list(self._queue) + [c.work for lane in self._lanes for c in lane.calls]:
            if work.cohort is cohort:
                work.done = True
        self._drop(cohort)
