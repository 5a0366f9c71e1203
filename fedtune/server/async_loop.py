"""The asynchronous server: an event loop on the virtual clock (FedBuff, FedAsync).

Up to ``strategy.concurrency`` clients train at once. Whenever one finishes (on the virtual
clock, ``fedtune.devices.clock``) the server receives its update - however stale: the server
updates made since the client fetched its model - and a new client starts on the current model:
an available client that is not training, drawn from (run.seed, the count of starts); with
``devices.arrival_rate`` the starts follow a Poisson process instead. The strategy
(``strategies.asynchronous``) says when the global model changes; a "round" of an asynchronous
run - a metrics.csv row, a checkpoint, a listener's ``round_ended`` - is one server update.

Training runs at full speed, in batches: a client's virtual duration is known when it starts,
so clients are trained only when their result is needed, and the clients that started on the
same model version train in one cohort call (``fedtune.server.phases.train_phase``: the
engines' cohort path, screening and the update bounds included). When the global model moves
on, the clients still untrained on the old one become a training call named then (its number
seeds their batches) whose model is kept until one of them is needed: clients the server never
hears of before the run ends are never trained. A client whose device goes offline before it
finishes is never trained either; its slot frees when it leaves. Everything the loop holds -
the table of clients in flight, their results, the named calls' models, the clock - is plain
attributes, which the checkpoint keeps beside the strategy's buffer, so a resumed run
continues bit for bit.

The clients in flight are one float64 table, a row per slot (``CLIENT`` ... ``ORDER``), so
starting one and removing it touch one row, not eight arrays; the next to finish is the top of
a heap of (finish, start number, slot) beside the table, the lowest free slot the top of
another (``AsyncRound._index``: rebuilt from the table, so a checkpoint needs neither).
Clients that finish at the same virtual moment are heard in the order they started, first come
first served: with instant devices (``devices.profile = 'none'``) every client finishes as it
starts, and a client heard and started again joins the back of the queue (while ties went by
client id, it was heard again ahead of everyone else and filled a FedBuff buffer alone). A
draw among one available client is no draw: its seeded generator is made only when there is a
choice (or a Poisson arrival to time); devices that are always available are not asked at each
start whether they are (``_always_available``), and a start indexes the idle clients without
listing them (``IdleClients``). The results wait by training call, not by client:
one entry per call, the model its clients started from and their clients.csv fields column by
column, and one per block of its trained models (a chunk's stack: ~32 rows), read-only arrays
that the checkpoint keeps without copying (``fedtune.server.checkpoint``); what the server will
hear of each of a call's clients in flight (``Heard``) is unpacked from them once per call,
when it trains or after a resume. A block is dropped once its last client in flight is heard,
the call's entry after its last client: a call's clients are heard over several server updates
(FedBuff's with lognormal devices: over three or four), and holding its stacks whole until the
last one raised a 1,000-client FedBuff run's peak memory from 1.7 to 2.0 GB (a block of
consecutive clients lives until its slowest: the blocks still hold ~2.5 rows per trained
client in flight there). The strategy gets a heard client's start and trained models by
reference (``receive_trained``: the trained one a ``StackedRow`` of its block) and may defer
its arithmetic to ``settle`` at the end of the server update; the sums it makes with
``ordered_sum`` are this loop's ``KeptRowSum`` (FedBuff's sum of the updates from one start
model: the rows added in a compiled loop as they arrive, ``fedtune.server.kept_row_sums``).
A checkpoint is captured after every server update (Ctrl-C writes the latest); with a
thousand clients in flight a dict per client made that capture cost more than the clients'
training, and each call's entry and each block is a ``FrozenMapping``: encoded once, not at
every capture.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from operator import attrgetter
from typing import Any, NamedTuple, cast

import numpy as np
from flwr.app import ConfigRecord, MetricRecord

from fedtune import protocol
from fedtune.config import Config
from fedtune.devices.clock import VirtualClock
from fedtune.devices.profiles import Diurnal
from fedtune.errors import ConfigError
from fedtune.results.run_dir import ClientRow, RoundRow
from fedtune.server.checkpoint import FrozenMapping
from fedtune.server.grid import CohortSpec, SimulatedGrid
from fedtune.server.guard import non_finite_tensors
from fedtune.server.phases import EvaluatePhase, UpdateBounds, evaluate_phase, train_phase
from fedtune.server.reports import ClientReport
from fedtune.server.round import (
    FederatedRun,
    RoundOutcome,
    evaluate_global,
    example_weighted,
    seed_sampling,
)
from fedtune.server.screening import reply_limits
from fedtune.server.stacked_rows import StackedRow
from fedtune.server.summing import weighted_metrics
from fedtune.train import TEST_COLUMNS, EvalResult
from strategies.asynchronous import AsynchronousStrategy

# a clients.csv row's numeric fields, kept as float64 columns (NaN: None)
_NUMBERS = ("num_examples", "train_loss", "epsilon", "duration_s", "examples_trained")
_COUNTS = frozenset({"num_examples", "examples_trained"})  # of _NUMBERS: ints in clients.csv
_NUMBER_FIELDS = attrgetter(*_NUMBERS)
_NO_CLIENTS = np.zeros(0, dtype=np.int64)
# a heard client's (start model, trained model), both read-only
Trained = tuple[dict[str, np.ndarray], Mapping[str, np.ndarray]]
# the columns of the table of clients in flight (float64: ids, versions and start numbers are
# exact); ORDER: the start's number, which orders clients that finish at the same moment
CLIENT, START, FINISH, VERSION, LOST, TRAINED, CALL, ORDER = range(8)
_FREE = np.array([-1.0, 0.0, np.inf, -1.0, 0.0, 1.0, -1.0, np.inf])  # a free slot: nobody


class Heard(NamedTuple):
    """What the server hears of a trained client: its clients.csv fields and its models."""

    num_examples: int | None
    train_loss: float | None
    epsilon: float | None
    duration_s: float | None
    examples_trained: int | None
    status: str
    reason: str
    trained: Trained | None  # None: no update
    block: str  # the key of the block of trained models its model is a row of ("": none)


class AsyncLoop:
    """The event loop's state (checkpointed with the strategy: plain attributes only)."""

    def __init__(self, config: Config, clock: VirtualClock) -> None:
        self.seed = config.run.seed
        self.concurrency = config.strategy.concurrency
        self.arrival_rate = clock.profiles.arrival_rate
        self.now = 0.0
        self.starts = 0  # clients started so far: names each start's random draw
        # training calls so far: seeds each call's clients (fedtune.protocol.DISPATCH), so a
        # client that finishes and starts again on the same model draws other batches
        self.dispatches = 0
        self.next_arrival = 0.0
        # the clients in flight: one row per slot (a free slot: client -1, finish +inf)
        slots = min(self.concurrency, clock.profiles.num_clients)
        self.flight = np.tile(_FREE, (slots, 1))
        # the ids of the clients in flight, ascending: the first ``flying`` entries (a list of
        # the idle ones, or a flag per client, would cost a pass over a million clients a start)
        self.busy = np.zeros(slots, dtype=np.int64)
        self.flying = 0  # clients in flight
        # str(training call) -> the model its clients started from and its version, for a call
        # named when the global model moved on, trained when one of its clients is needed
        self.pending: dict[str, dict[str, Any]] = {}
        # str(training call) -> its results (``_call_results``), until its last client is heard
        self.results: dict[str, dict[str, Any]] = {}
        # "call.block" -> a block of a call's trained models (tensor name -> rows), until the
        # last client in flight whose model is one of its rows is heard
        self.blocks: dict[str, Mapping[str, np.ndarray]] = {}

    # --- starting clients ------------------------------------------------------------------

    def _draw(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 28, self.starts])

    def next_start(self, clock: VirtualClock) -> tuple[float, np.ndarray | IdleClients]:
        """When the next client may start and the clients available then, ascending (none:
        no slot)."""
        population = clock.profiles.num_clients
        if self.flying >= len(self.flight) or self.flying >= population:
            return np.inf, _NO_CLIENTS
        moment = max(self.now, self.next_arrival) if self.arrival_rate else self.now
        busy = self.busy[:self.flying]
        if _always_available(clock):
            return moment, IdleClients(population, busy)
        idle = np.ones(population, dtype=bool)
        idle[busy] = False
        idle = idle.nonzero()[0]  # np.flatnonzero's, without its wrapper's cost
        available = idle[clock.available(idle, moment)]
        if not len(available):
            moment = float(clock.next_available(idle, moment).min()) + 1e-6
            available = idle[clock.available(idle, moment)]
        return moment, available

    def start_client(self, clock: VirtualClock, moment: float,
                     available: np.ndarray | IdleClients, version: int, durations: np.ndarray,
                     slot: int) -> tuple[float, int, int]:
        """One client starts at ``moment`` on model ``version`` in the free ``slot`` (the
        lowest: ``AsyncRound``'s heap of them); ``durations``: every client's virtual
        duration, ``VirtualClock.durations``. Its (finish, start number, slot)."""
        # a draw among one candidate picks it: the generator (seeded afresh per start) is
        # made only when it draws something
        rng = self._draw() if self.arrival_rate or len(available) > 1 else None
        # Generator.choice(a) is a[Generator.integers(0, len(a))], the same draw
        client = int(available[0] if rng is None else available[int(rng.integers(len(available)))])
        order = self.starts
        self.starts += 1
        if rng is not None and self.arrival_rate:
            self.next_arrival = moment + float(rng.exponential(1.0 / self.arrival_rate))
        self.now = moment
        finish = moment + float(durations[client])
        offline = np.inf if _always_available(clock) else float(
            clock.online_until(np.array([client]), moment)[0])
        lost = finish > offline  # a lost client's work is never needed: "trained"
        finish = min(finish, offline)
        self.flight[slot] = (client, moment, finish, version, lost, lost, -1, order)
        at, flying = int(self.busy[:self.flying].searchsorted(client)), self.flying
        self.busy[at + 1:flying + 1] = self.busy[at:flying]
        self.busy[at] = client
        self.flying += 1
        return finish, order, slot

    def finishing(self) -> list[tuple[float, int, int]]:
        """The clients in flight as a heap of (finish, start number, slot): its first is the
        client the server hears of next (earliest; of those finishing together, the first to
        start)."""
        taken = np.flatnonzero(self.flight[:, CLIENT] >= 0)
        heap = [(float(self.flight[slot, FINISH]), int(self.flight[slot, ORDER]), int(slot))
                for slot in taken]
        heapq.heapify(heap)
        return heap

    def pop(self, slot: int) -> tuple[int, float, float, int, bool, int]:
        """Free a slot: its (client, start, finish, version, lost, training call)."""
        client, start, finish, version, lost, _, call, _ = self.flight[slot].tolist()
        self.flight[slot] = _FREE
        at, flying = int(self.busy[:self.flying].searchsorted(client)), self.flying
        self.busy[at:flying - 1] = self.busy[at + 1:flying]
        self.flying -= 1
        return int(client), start, finish, int(version), bool(lost), int(call)


class IdleClients:
    """The clients not in flight, ascending, without listing them: the k-th is k plus the number
    of busy clients below it (a list of a million idle clients cost ~1 ms a start)."""

    def __init__(self, population: int, busy: np.ndarray) -> None:
        """``busy``: the ids in flight, ascending."""
        self.count = population - len(busy)
        self.below = busy - np.arange(len(busy))  # idle clients below each busy one

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self.count:
            raise IndexError(k)
        return k + int(self.below.searchsorted(k, side="right"))


class AsyncRound:
    """Plays one server update of an asynchronous run (the loop's ``play`` for
    ``fedtune.server.loop.run_rounds``)."""

    def __init__(self, run: FederatedRun, loop: AsyncLoop, clock: VirtualClock) -> None:
        if not isinstance(run.grid, SimulatedGrid) or not run.identities.fixed:
            raise ConfigError(
                f"strategy.name = {run.config.strategy.name!r} is not allowed on this runtime: "
                "must run on engine.backend = 'ray' or 'inprocess' (an asynchronous server "
                "starts clients on a virtual clock through fedtune's own engines; a SuperLink "
                "deployment runs rounds)")
        # the entry's class: a privacy mode that replaces strategies refuses asynchronous ones
        # (its entry's asynchronous_refused)
        self.strategy = cast(AsynchronousStrategy, run.strategy)
        # numba's import (~0.3 s): asynchronous runs only
        from fedtune.server.kept_row_sums import KeptRowSum
        self.strategy.ordered_sum = KeptRowSum
        self.run, self.loop, self.clock = run, loop, clock
        nodes = run.identities.node_to_client
        # the client -> node map: a simulation's NodeRange inverts itself in constant memory;
        # pinned nodes (engine.node_ids) are few, so their dict is inverted once
        self.node_of = getattr(nodes, "node_of", None) or {
            client: node for node, client in nodes.items()}.__getitem__
        self.population = len(nodes)
        self.limits = reply_limits(run.config, run.resources.federation)
        self.duration_bytes, self.duration_of = -1, np.zeros(0)  # ``_durations``' cache
        # kept beside the table, built from it at the first server update (after a resume has
        # restored it), so a checkpoint needs none of them: its clients by finish
        # (``AsyncLoop.finishing``), its free slots (a heap: the lowest is taken), and per
        # trained call the clients in flight it still holds results for, and per block of
        # trained models the clients in flight whose model it holds (``_heard`` drops each
        # after the last)
        self.finishing: list[tuple[float, int, int]] = []
        self.free: list[int] = []
        self.waiting: dict[int, int] = {}
        self.in_block: dict[str, int] = {}
        self.indexed = False
        # a trained client in flight -> what the server hears of it (``Heard``), made per call
        # from its results (``_unpack``)
        self.ready: dict[int, Heard] = {}

    def _train(self, server_round: int, totals: dict[str, Any], slot: int) -> None:
        """Train the call the client in ``slot`` belongs to, in one cohort: a call named when
        the model moved on (``_name_call``: on that model, as that server update), or else
        every untrained client, all on the current model; keep what the strategy needs of each
        accepted update."""
        loop, state = self.loop, self.run.state
        call = int(loop.flight[slot, CALL])
        members = (loop.flight[:, TRAINED] == 0) & (loop.flight[:, CALL] == call)
        if call < 0:  # on the current model: a new call
            call, start = loop.dispatches, _read_only(protocol.to_numpy(state.arrays))
            loop.dispatches += 1
            arrays, as_round = state.arrays, server_round
        else:
            named = loop.pending.pop(str(call))
            start, as_round = named["start"], int(named["version"]) + 1
            arrays = protocol.to_array_record(start)
        clients = sorted(int(c) for c in loop.flight[members, CLIENT])
        messages = self.strategy.start_messages(as_round, arrays,
                                                [self.node_of(c) for c in clients], call)
        config = self.run.config
        bounds = UpdateBounds(arrays, config.strategy.max_update_norm,
                              config.strategy.update_norm_z)
        train = train_phase(
            self.run.grid, messages, CohortSpec(weighted_mean=False, limits=self.limits),
            as_round, self.run.identities, bounds, config.strategy.round_timeout_s,
            lambda done, total: self.run.progress(server_round, "train", done, total),
            self.run.stop)
        loop.results[str(call)], blocks = _call_results(clients, train.rows(as_round), start,
                                                        train.accepted_reports)
        loop.blocks.update((f"{call}.{b}", block) for b, block in enumerate(blocks))
        loop.flight[members, CALL] = call
        loop.flight[members, TRAINED] = 1
        self._unpack(call)
        totals["bytes_up"] += train.bytes_up
        totals["bytes_down"] += train.bytes_down
        totals["dropped"] += train.dropped

    def _name_call(self, version: int) -> None:
        """The global model is about to move on from ``version``: the clients that started on
        it and are not trained yet become one training call, named now (its number seeds their
        batches) and trained when one of them is needed (``_train``) - never, for those the
        server does not hear of before the run ends. Its model is kept until then."""
        loop = self.loop
        waiting = (loop.flight[:, TRAINED] == 0) & (loop.flight[:, CALL] < 0)
        if not waiting.any():
            return
        loop.pending[str(loop.dispatches)] = {
            "version": version, "start": _read_only(protocol.to_numpy(self.run.state.arrays))}
        loop.flight[waiting, CALL] = loop.dispatches
        loop.dispatches += 1

    def _index(self) -> None:
        """Build what is kept beside the table (``__init__``) from it."""
        flight = self.loop.flight
        self.finishing = self.loop.finishing()
        self.free = np.flatnonzero(flight[:, CLIENT] < 0).tolist()  # ascending: a heap
        for call in np.unique(flight[(flight[:, TRAINED] == 1) & (flight[:, CALL] >= 0), CALL]):
            self._unpack(int(call))
        self.indexed = True

    def _unpack(self, call: int) -> None:
        """What the server will hear of each client in flight of the trained ``call``, from
        its results (``_call_results``), all at once (``ready``): column by column, a Python
        object per client only for its ``Heard`` and its trained model."""
        loop = self.loop
        results = loop.results[str(call)]
        flying = (loop.flight[:, CALL] == call) & (loop.flight[:, TRAINED] == 1)
        clients = np.sort(loop.flight[flying, CLIENT].astype(np.int64))
        rows = np.searchsorted(results["client"], clients)
        columns = _columns(results["numbers"][rows])
        statuses, reasons = _notes(results["notes"], rows.tolist())
        where, starts = results["where"].tolist(), results["start"]
        kept_at = results["kept_at"][rows].tolist()
        keys = ["" if at < 0 else f"{call}.{where[at][0]}" for at in kept_at]
        trained = [None if at < 0 else (starts, StackedRow(loop.blocks[key], where[at][1]))
                   for at, key in zip(kept_at, keys, strict=True)]
        self.ready.update(zip(clients.tolist(), map(Heard._make, zip(
            *columns, statuses, reasons, trained, keys, strict=True)), strict=True))
        self.waiting[call] = len(clients)
        for key in filter(None, keys):
            self.in_block[key] = self.in_block.get(key, 0) + 1

    def _heard(self, server_round: int, client: int, start: float, finish: float,
               staleness: int, lost: bool, call: int) -> tuple[ClientRow, Trained | None]:
        """A client the server hears of: its clients.csv row and its (start, trained) models
        (None: no update); its call's results are dropped after its last client in flight."""
        if lost:
            return ClientRow(server_round, client, None, None, None, None, "offline",
                             "the device went offline before it finished",
                             virtual_start_s=start, virtual_duration_s=finish - start), None
        heard = self.ready.pop(client)
        self.waiting[call] -= 1
        if not self.waiting[call]:
            del self.waiting[call], self.loop.results[str(call)]
        if heard.block:
            self.in_block[heard.block] -= 1
            if not self.in_block[heard.block]:  # whoever took its rows holds them still
                del self.in_block[heard.block], self.loop.blocks[heard.block]
        return ClientRow(server_round, client, heard.num_examples, heard.train_loss,
                         heard.epsilon, heard.duration_s, heard.status, heard.reason,
                         heard.examples_trained, "train", start, finish - start,
                         staleness), heard.trained

    def __call__(self, run: FederatedRun, server_round: int) -> RoundOutcome:
        """Run the event loop until the strategy updates the global model once."""
        loop, state, strategy = self.loop, run.state, self.strategy
        began = time.perf_counter()
        version = server_round - 1  # server updates made so far
        durations = self._durations(state.arrays.count_bytes())
        totals = {"bytes_up": 0, "bytes_down": 0, "dropped": 0}
        rows: list[ClientRow] = []
        accepted: list[dict[str, Any]] = []
        run.progress(server_round, "train", 0, 0)
        # clients heard from in a row without an update (failed, rejected, offline, declined):
        # after this many the server update ends without a change of the model
        fruitless, patience = 0, 2 * max(loop.concurrency, self.population)
        model_update = ""
        if not self.indexed:
            self._index()
        finishing, free = self.finishing, self.free
        while True:
            moment, available = loop.next_start(self.clock)
            if len(available) and (not finishing or moment <= finishing[0][0]):
                heapq.heappush(finishing, loop.start_client(
                    self.clock, moment, available, version, durations, heapq.heappop(free)))
                continue
            if not finishing:
                raise RuntimeError("devices: no client is ever available to start")
            slot = heapq.heappop(finishing)[2]
            if not loop.flight[slot, TRAINED]:
                self._train(server_round, totals, slot)
            client, start, finish, started_on, lost, call = loop.pop(slot)
            heapq.heappush(free, slot)
            loop.now = finish
            row, trained = self._heard(server_round, client, start, finish,
                                       version - started_on, lost, call)
            refused = strategy.refuses(client) if trained is not None else ""
            if refused:  # central DP: its update is already in this buffer
                row.status, row.reason, trained = "rejected", refused, None
            rows.append(row)
            if trained is None:  # offline, failed, rejected: the slot frees, nothing arrives
                fruitless += 1
                if fruitless >= patience:
                    state.rounds_without_update += 1
                    model_update = f"kept: no update from the last {fruitless} clients"
                    break
                continue
            fruitless = 0
            metrics: dict[str, Any] = {protocol.NUM_EXAMPLES: row.num_examples or 0}
            if row.train_loss is not None:  # none: the client saw no example
                metrics[protocol.TRAIN_LOSS] = row.train_loss
            accepted.append(metrics)
            if strategy.receive_trained(*trained, version - started_on,
                                        float(row.num_examples or 0), client):
                break
        strategy.settle()  # before the release and any checkpoint of the buffer
        self._name_call(version)  # whoever started on the model about to be replaced
        model_update = model_update or self._release()
        return self._outcome(server_round, rows, accepted, totals, model_update, began)

    def _durations(self, model_bytes: int) -> np.ndarray:
        """Every client's virtual duration with a model of ``model_bytes`` each way."""
        if self.duration_bytes != model_bytes:
            everyone = np.arange(self.clock.profiles.num_clients)
            self.duration_of = self.clock.durations(everyone, model_bytes, model_bytes)
            self.duration_bytes = model_bytes
        return self.duration_of

    def _release(self) -> str:
        state = self.run.state
        current = protocol.to_numpy(state.arrays)
        new = protocol.to_array_record(self.strategy.release(current))
        bad = non_finite_tensors(new)
        if bad:
            state.rounds_without_update += 1
            return f"kept: the update is not finite (in {', '.join(bad[:3])})"
        state.arrays = new
        state.rounds_without_update = 0
        return "applied"

    def _outcome(self, server_round: int, rows: list[ClientRow],
                 accepted: list[dict[str, Any]], totals: dict[str, Any], model_update: str,
                 began: float) -> RoundOutcome:
        run, state = self.run, self.run.state
        released = self.strategy.release_metrics() if model_update == "applied" else {}
        metrics = MetricRecord({**weighted_metrics(accepted), **released}) if accepted else None
        run.privacy.record_round(rows, accepted, metrics)
        state.virtual_time_s = self.loop.now
        every = run.config.strategy.eval_every
        evaluation, global_eval = EvaluatePhase([], 0, 0), None
        if server_round % every == 0 or server_round == run.config.run.rounds:
            seed_sampling(run.config.run.seed, server_round, "evaluate")
            to_evaluate = list(run.strategy.configure_evaluate(server_round, state.arrays,
                                                               ConfigRecord(), run.grid))
            evaluation = evaluate_phase(
                run.grid, to_evaluate, self.limits, server_round, run.identities,
                run.config.strategy.round_timeout_s,
                lambda done, total: run.progress(server_round, "evaluate", done, total),
                run.stop)
            run.progress(server_round, "test", 0, 0)
            global_eval = evaluate_global(run.resources, state.arrays)
        ok = sum(r.status == "ok" for r in rows)
        rows.sort(key=lambda r: r.client_id or 0)
        row = RoundRow(
            round=server_round, train_loss=example_weighted(accepted, protocol.TRAIN_LOSS),
            **_tested(global_eval), **run.privacy.columns(),
            clients_sampled=len(rows), clients_ok=ok, clients_failed=len(rows) - ok,
            bytes_up=totals["bytes_up"] + evaluation.bytes_up,
            bytes_down=totals["bytes_down"] + evaluation.bytes_down,
            wall_s=time.perf_counter() - began,
            federated_eval_loss=example_weighted(evaluation.metrics, protocol.EVAL_LOSS),
            federated_eval_accuracy=example_weighted(evaluation.metrics, protocol.EVAL_ACCURACY),
            model_update=model_update, replies_dropped=totals["dropped"] + evaluation.dropped,
            virtual_time_s=self.loop.now)
        return RoundOutcome(row, rows, global_eval, metrics, len(rows), 0,
                            evaluation.rows(server_round))


def _always_available(clock: VirtualClock) -> bool:
    """Whether every device is available at every moment (a diurnal window of the whole day:
    ``devices.profile = 'none'``, lognormal's default, a trace without availability), so that
    the clock need not be asked per start (~3 us a start: a thousand per FedBuff update of
    K = 1,000)."""
    availability = clock.profiles.availability
    return isinstance(availability, Diurnal) and availability.fraction >= 1


def _tested(evaluation: EvalResult | None) -> dict[str, float | None]:
    """metrics.csv's global test columns (empty between evaluations)."""
    if evaluation is None:
        return dict.fromkeys(TEST_COLUMNS)
    return evaluation.test_columns()


def _call_results(clients: list[int], rows: list[ClientRow], start: dict[str, np.ndarray],
                  accepted: list[ClientReport]
                  ) -> tuple[dict[str, Any], list[Mapping[str, np.ndarray]]]:
    """One training call's results, read-only: its clients (sorted), their clients.csv rows'
    numbers (float64 columns, NaN: None) and any status but ok or reason ("notes", by row),
    the model they started from and, where ``kept_at`` says so, where the accepted clients'
    trained models are (in client order: ``where``); and those models in blocks of stacked
    rows (``_stacked``)."""
    by_client = {row.client_id: row for row in rows}
    ordered = [by_client[c] for c in clients]
    numbers = np.array(list(map(_NUMBER_FIELDS, ordered)),  # None: NaN
                       dtype=np.float64).reshape(len(clients), len(_NUMBERS))
    notes = {str(i): [row.status, row.reason] for i, row in enumerate(ordered)
             if row.status != "ok" or row.reason != ""}
    kept_at = np.full(len(clients), -1, dtype=np.int64)
    kept_at[np.searchsorted(clients, np.array([r.client_id for r in accepted], dtype=np.int64))
            ] = np.arange(len(accepted))
    blocks, where = _stacked([_trained(report) for report in accepted], list(start))
    results = {"client": np.array(clients, dtype=np.int64), "numbers": numbers,
               "kept_at": kept_at, "start": start, "where": where}
    for array in (results["client"], numbers, kept_at, where, *start.values(),
                  *(a for block in blocks for a in block.values())):
        array.flags.writeable = False  # the checkpoint keeps it without a copy
    return (FrozenMapping({**results, "notes": notes}),
            [FrozenMapping(block) for block in blocks])


def _columns(numbers: np.ndarray) -> list[list[Any]]:
    """clients.csv's numbers (``_NUMBERS``), a list per column, from their float64 rows: NaN
    is None, the counts (``_COUNTS``) are ints."""
    columns = []
    for name, column in zip(_NUMBERS, numbers.T, strict=True):
        missing = np.isnan(column)
        values = (np.where(missing, 0, column).astype(np.int64) if name in _COUNTS
                  else column).astype(object)
        values[missing] = None
        columns.append(values.tolist())
    return columns


def _notes(notes: Mapping[str, list[str]], rows: list[int]) -> tuple[list[str], list[str]]:
    """The status and reason of each of ``rows`` of a call's results ("notes": by row, only
    those other than ok without a reason)."""
    statuses, reasons = ["ok"] * len(rows), [""] * len(rows)
    if notes:
        for i, row in enumerate(rows):
            statuses[i], reasons[i] = notes.get(str(row), ("ok", ""))
    return statuses, reasons


def _read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays``, made read-only (the checkpoint keeps them without a copy)."""
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def _stacked(models: list[Mapping[str, np.ndarray]], names: list[str]
             ) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The trained models as blocks of arrays stacked along a first axis, and ``where``: model
    j is row ``where[j, 1]`` of block ``where[j, 0]``. A model that is a row of a cohort's
    stacked copy (a ``StackedRow`` whose arrays own their data, as a chunk kept in process
    does) keeps those arrays (no copy: a thousand updates in flight are a quarter of a GB);
    the others (one at a time, or a Ray actor's, whose arrays are views of its reply) are
    stacked here, in one block."""
    blocks: list[dict[str, np.ndarray]] = []
    index: dict[int, int] = {}  # id(a stack) -> its block, -1: not kept as it is
    where = np.zeros((len(models), 2), dtype=np.int64)
    loose: list[int] = []
    for j, model in enumerate(models):
        if not isinstance(model, StackedRow):
            loose.append(j)
            continue
        if id(model.stack) not in index:
            index[id(model.stack)] = len(blocks) if _owns_rows(model.stack, names) else -1
            if index[id(model.stack)] >= 0:
                blocks.append({name: model.stack[name] for name in names})
        block = index[id(model.stack)]
        if block < 0:
            loose.append(j)
        else:
            where[j] = block, model.row
    if loose:
        where[loose] = np.column_stack([np.full(len(loose), len(blocks)), np.arange(len(loose))])
        blocks.append({name: np.stack([models[j][name] for j in loose]) for name in names})
    return blocks, where


def _owns_rows(stack: Mapping[str, np.ndarray], names: list[str]) -> bool:
    """Whether ``stack`` has ``names`` as C-contiguous arrays of as many rows that own their
    data (the checkpoint keeps such an array without a copy)."""
    arrays = [stack.get(name) for name in names]
    return bool(names) and all(
        isinstance(a, np.ndarray) and a.base is None and a.flags.c_contiguous and a.ndim >= 1
        and len(a) == len(arrays[0]) for a in arrays)  # type: ignore[arg-type]


def _trained(report: ClientReport) -> Mapping[str, np.ndarray]:
    """An accepted client's trained model: kept one by one by a cohort, or its reply."""
    if report.update is not None:
        return report.update[protocol.ARRAYS]
    assert report.reply is not None  # the message path keeps the accepted reply
    return protocol.to_numpy(report.reply.content[protocol.ARRAYS])

