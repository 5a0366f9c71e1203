"""fedtune's fast engine: a Flower ``Grid`` whose nodes are virtual clients that a pool of
long-lived Ray actors serves.

Flower's simulation starts a ClientApp for every message and rebuilds its model and data each
time. Here each actor (``ClientWorker``) loads data and one model once and then serves many
clients per round, like pfl-research's workers (Granqvist et al. 2024, "pfl-research:
simulation framework for accelerating research in Private Federated Learning").

Dispatch. ``push_messages`` puts each distinct ArrayRecord into Ray's object store once and
queues one task per message. Tasks go to actors in batches of about ``BATCH_S`` seconds of
client work (a Ray call costs about a millisecond, as much as a small client's step), and each
actor is kept ``CALLS_PER_ACTOR`` calls ahead, so it never waits for the driver and a slower
actor takes fewer tasks. ``pull_messages`` waits up to ``PULL_WAIT_S`` for results, hands out
more batches and returns the replies that are in.

Client state. The driver keeps each client's ``Context.state`` between rounds and ships it with
the task; the state that comes back replaces it when the reply is not an error. State therefore
survives a dead actor, any actor can serve any client, and a client that never had state costs
nothing (Flower's simulation ships the whole Context with every message the same way).

Faults. A ClientApp that raises gives an error reply (as in Flower's runtimes). When an actor
dies, a new one takes its place and its unfinished tasks are queued again; the tasks of the
call it died in then run alone: one per call, on an actor with nothing else to do (a dying
process can also lose the result of the call before, so only a lone task is known to be the
one it died on). A lone task whose actor dies gets an error reply
(``ErrorCode.CLIENT_APP_CRASHED``). A call still running ``engine.client_timeout_s`` after it
should have finished has its actor killed and replaced in the same way; a lone task that
overruns gets an error reply with ``ErrorCode.REPLY_MESSAGE_UNAVAILABLE`` (what a SuperLink
answers for an expired reply), which the server reports as a timeout. So a faulty client is
reported after its second attempt, a straggler after at most twice the timeout. A replacement
actor that cannot start retires its slot; with no actor left every queued message fails, so
the server never waits for nothing.

Push-down (``fold_train``): training updates are folded into per-actor partial sums
(``fedtune.server.folded``). An actor's folded replies are held until its partial sum is in and
released together, the last one carrying the sum; if the actor dies first, they run again.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ray
from flwr.app import ArrayRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run

from fedtune.engine.inprocess import NODE_ID_OFFSET, act_as_server, error_reply
from fedtune.engine.ray_pool import ActorFactory, stop_actors
from fedtune.engine.ray_worker import ClientOutcome, ClientTask, PartialSum
from fedtune.protocol import NUM_PARTITIONS, PARTITION_ID
from fedtune.server.checkpoint import state_from_bytes, state_to_bytes
from fedtune.server.folded import attach_sum
from fedtune.server.grid import SimulatedGrid

BATCH_S = 0.05  # client work per Ray call, once the time of a task is known
MAX_BATCH = 64
CALLS_PER_ACTOR = 2
PULL_WAIT_S = 0.05
PUSHED_ARRAYS_KEPT = 4  # ArrayRecords whose object-store copy later pushes reuse


@dataclass
class _Job:
    """A pushed message that has no reply yet."""

    message: Message
    task: ClientTask
    alone: bool = False  # its call's actor died or overran: it now runs alone


@dataclass
class _Call:
    """A call in an actor's queue: serving a batch of messages, or taking a partial sum."""

    ref: ray.ObjectRef
    message_ids: list[str] = field(default_factory=list)
    fold: str = ""
    expected_s: float = 0.0  # how long the batch should take
    alone: bool = False  # one task with the actor to itself: a death there is its own


@dataclass
class _Lane:
    """One actor slot: the actor, its calls in the order it runs them, its held replies."""

    actor: ray.actor.ActorHandle
    starting: ray.ObjectRef | None  # ready() while the actor loads data and model
    started_at: float
    calls: deque[_Call] = field(default_factory=deque)
    busy_since: float = 0.0  # when the first call in ``calls`` started (as the driver saw it)
    held: dict[str, ClientOutcome] = field(default_factory=dict)  # folded, sum not taken yet
    open_folds: set[str] = field(default_factory=set)  # folds with updates not yet taken
    retired: bool = False


class RayGrid(SimulatedGrid):
    """A Grid of ``num_clients`` virtual clients served by long-lived Ray actors."""

    def __init__(self, factory: ActorFactory, actors: list[ray.actor.ActorHandle],
                 num_clients: int, client_timeout_s: float, start_timeout_s: float,
                 fold_train: bool = False) -> None:
        self._factory = factory
        self._run = Run.create_empty(factory.run_id)
        act_as_server(factory.run_id)
        self._num_clients = num_clients
        self._client_timeout_s = client_timeout_s
        self._start_timeout_s = start_timeout_s
        self._fold_train = fold_train
        now = time.monotonic()
        self._lanes = [_Lane(actor, None, now) for actor in actors]
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[str] = deque()
        self._queued_folds: Counter[str] = Counter()
        self._replies: dict[str, Message] = {}
        self._pushed: OrderedDict[int, tuple[ArrayRecord, ray.ObjectRef]] = OrderedDict()
        self._task_s: dict[str, float] = {}  # running mean of a task's time, by message type
        self._retired_reason = ""
        self.states: dict[int, RecordDict] = {}  # node id -> Context.state (clients with state)
        self._changed: set[int] = set()  # nodes whose state changed since the last capture
        self.node_to_client = {NODE_ID_OFFSET + c: c for c in range(num_clients)}
        self.restarts = 0  # actors replaced after dying or overrunning

    # --- Grid ---

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self._num_clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        fold = uuid.uuid4().hex if self._fold_train else ""  # one partial sum per push
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.node_to_client:
                raise ValueError(f"no node {node} in this grid")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as a SuperLink assigns it
            train = message.metadata.message_type == MessageType.TRAIN
            self._jobs[message_id] = _Job(message, self._task(message, fold if train else ""))
            ids.append(message_id)
        self._enqueue(ids)
        self._pump(wait_s=0)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that are in for ``message_ids`` (waiting up to PULL_WAIT_S for one)."""
        wanted = list(message_ids)
        self._pump(wait_s=0 if any(i in self._replies for i in wanted) else PULL_WAIT_S)
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

    # --- beyond Flower's Grid ---

    def discard(self, message_ids: Iterable[str]) -> None:
        """Forget messages the server stopped waiting for; results that still come are dropped."""
        dropped = {i for i in message_ids if self._jobs.pop(i, None) is not None}
        for message_id in dropped:
            self._replies.pop(message_id, None)
        if dropped:
            self._queue = deque(i for i in self._queue if i not in dropped)
            self._queued_folds = Counter(self._jobs[i].task.fold for i in self._queue
                                         if self._jobs[i].task.fold)

    def close(self) -> None:
        """Kill every actor now (the end of the Ray session would too, later)."""
        stop_actors([lane.actor for lane in self._lanes])
        self._lanes = []

    def changed_client_states(self) -> dict[int, bytes]:
        """Serialised Context.state of each client whose state changed since the last call
        (keyed by partition id), for checkpoints."""
        changed = {self.node_to_client[node]: state_to_bytes(self.states[node])
                   for node in sorted(self._changed)}
        self._changed.clear()
        return changed

    def restore_client_states(self, states: Mapping[int, bytes]) -> None:
        """Give clients back the Context.state a checkpoint recorded."""
        self.states = {NODE_ID_OFFSET + client: state_from_bytes(data)
                       for client, data in states.items()}

    @property
    def actor_count(self) -> int:
        return sum(1 for lane in self._lanes if not lane.retired)

    # --- dispatch ---

    def _task(self, message: Message, fold: str) -> ClientTask:
        arrays, rest = {}, RecordDict()
        for key, record in message.content.items():
            if isinstance(record, ArrayRecord):
                arrays[key] = self._put(record)
            else:
                rest[key] = record
        node = message.metadata.dst_node_id
        return ClientTask(
            metadata=message.metadata, content=rest, arrays=arrays,
            order=tuple(message.content.keys()),
            node_config={PARTITION_ID: self.node_to_client[node],
                         NUM_PARTITIONS: self._num_clients},
            state=self.states.get(node), fold=fold,
        )

    def _put(self, record: ArrayRecord) -> ray.ObjectRef:
        """The object-store copy of ``record``: one put however many messages carry it."""
        key = id(record)  # the entry holds ``record``, so its id cannot be reused meanwhile
        if key not in self._pushed:
            self._pushed[key] = (record, ray.put(record))
            while len(self._pushed) > PUSHED_ARRAYS_KEPT:
                self._pushed.popitem(last=False)
        return self._pushed[key][1]

    def _enqueue(self, message_ids: list[str], front: bool = False) -> None:
        live = [i for i in message_ids if i in self._jobs]
        self._queued_folds.update(f for i in live if (f := self._jobs[i].task.fold))
        if front:
            self._queue.extendleft(reversed(live))
        else:
            self._queue.extend(live)

    def _pump(self, wait_s: float) -> None:
        """Collect finished calls, stop overrunning actors, hand out batches, take sums."""
        self._dispatch()
        waiting = [lane.starting for lane in self._lanes if lane.starting is not None]
        waiting += [call.ref for lane in self._lanes for call in lane.calls]
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            if not ready and wait_s > 0:
                ray.wait(waiting, num_returns=1, timeout=wait_s)
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            done = set(ready)
            for lane in self._lanes:
                self._collect(lane, done)
        self._stop_overruns()
        self._dispatch()

    def _dispatch(self) -> None:
        lanes = [lane for lane in self._lanes if not lane.retired and lane.starting is None
                 and not any(call.alone for call in lane.calls)]
        while self._queue and lanes:
            alone = self._jobs[self._queue[0]].alone
            lane = min(lanes, key=lambda candidate: len(candidate.calls))
            if len(lane.calls) >= (1 if alone else CALLS_PER_ACTOR):
                break
            batch = self._next_batch(len(lanes))
            tasks = [self._jobs[i].task for i in batch]
            for task in tasks:
                if task.fold:
                    self._queued_folds[task.fold] -= 1
                    lane.open_folds.add(task.fold)
            expected = len(tasks) * self._task_s.get(tasks[0].metadata.message_type, 0.0)
            self._call(lane, _Call(lane.actor.serve.remote(tasks), batch, expected_s=expected,
                                   alone=alone))
            if alone:
                lanes.remove(lane)
        for lane in lanes:  # a fold with nothing left to hand out: take the partial sum
            for fold in [f for f in lane.open_folds if self._queued_folds[f] <= 0]:
                lane.open_folds.discard(fold)
                self._call(lane, _Call(lane.actor.take_sum.remote(fold), fold=fold))
        if not any(not lane.retired for lane in self._lanes):
            self._fail_queue("no Ray actor is left to run it")

    def _next_batch(self, num_lanes: int) -> list[str]:
        """The next queued messages for one call: about BATCH_S of work, a fair share of the
        queue, and alone for a message whose previous batch failed."""
        batch = [self._queue.popleft()]
        if self._jobs[batch[0]].alone:
            return batch
        task_s = self._task_s.get(self._jobs[batch[0]].task.metadata.message_type)
        size = 1 if task_s is None else int(BATCH_S / max(task_s, 1e-6))
        share = math.ceil((len(self._queue) + 1) / (num_lanes * CALLS_PER_ACTOR))
        size = max(1, min(size, share, MAX_BATCH))
        while self._queue and len(batch) < size and not self._jobs[self._queue[0]].alone:
            batch.append(self._queue.popleft())
        return batch

    @staticmethod
    def _call(lane: _Lane, call: _Call) -> None:
        if not lane.calls:
            lane.busy_since = time.monotonic()
        lane.calls.append(call)

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
            if call.fold:
                self._release(lane, result)
            elif isinstance(result, Exception):
                for message_id in call.message_ids:
                    if (job := self._jobs.get(message_id)) is not None:
                        self._deliver(message_id,
                                      ClientOutcome(error_reply(job.message, result), None, 0.0))
            else:
                for message_id, outcome in zip(call.message_ids, result, strict=True):
                    self._learn(outcome)
                    if outcome.folded:
                        lane.held[message_id] = outcome
                    else:
                        self._deliver(message_id, outcome)

    def _learn(self, outcome: ClientOutcome) -> None:
        kind = outcome.reply.metadata.message_type
        previous = self._task_s.get(kind, outcome.seconds)
        self._task_s[kind] = 0.8 * previous + 0.2 * outcome.seconds

    def _deliver(self, message_id: str, outcome: ClientOutcome) -> None:
        job = self._jobs.pop(message_id, None)
        if job is None:  # discarded meanwhile
            return
        reply = outcome.reply
        if outcome.state is not None and not reply.has_error():
            self.states[job.message.metadata.dst_node_id] = outcome.state
            self._changed.add(job.message.metadata.dst_node_id)
        self._replies[message_id] = reply

    def _release(self, lane: _Lane, partial: PartialSum | Exception) -> None:
        """A partial sum is in: release the replies folded into it, the last carrying the sum."""
        if isinstance(partial, Exception):
            raise partial  # take_sum only pops a dict: this is a bug, not a client's fault
        held = [(i, lane.held.pop(i)) for i in partial.message_ids if i in lane.held]
        live = [outcome for message_id, outcome in held if message_id in self._jobs]
        if live:
            attach_sum(live[-1].reply, partial.total)
        for message_id, outcome in held:
            self._deliver(message_id, outcome)

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
        """The lane's actor died (or overran) during ``culprit``: a lone task there fails, other
        tasks of that call run again alone; everything else of the lane runs again."""
        again = list(culprit.message_ids)
        if culprit.alone:
            if (job := self._jobs.get(again.pop())) is not None:
                error = Message(Error(code=code, reason=reason), reply_to=job.message)
                self._deliver(job.message.metadata.message_id, ClientOutcome(error, None, 0.0))
        for message_id in again:
            if message_id in self._jobs:
                self._jobs[message_id].alone = True
        again += [i for call in lane.calls for i in call.message_ids]
        again += list(lane.held)
        self._enqueue(again, front=True)
        ray.kill(lane.actor, no_restart=True)  # dead already, or stuck: make sure
        lane.calls.clear()
        lane.held.clear()
        lane.open_folds.clear()
        lane.actor, lane.starting = self._factory.start()
        lane.started_at = time.monotonic()
        self.restarts += 1

    def _retire(self, lane: _Lane, error: BaseException) -> None:
        """A replacement actor could not start: its slot stays empty for the rest of the run."""
        lane.retired = True
        lane.starting = None
        self._retired_reason = f"{type(error).__name__}: {error}"
        ray.kill(lane.actor, no_restart=True)

    def _fail_queue(self, reason: str) -> None:
        while self._queue:
            message_id = self._queue.popleft()
            if (job := self._jobs.get(message_id)) is not None:
                error = Error(code=ErrorCode.CLIENT_APP_CRASHED,
                              reason=f"{reason}: {self._retired_reason}")
                self._deliver(message_id,
                              ClientOutcome(Message(error, reply_to=job.message), None, 0.0))
