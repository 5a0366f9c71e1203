"""The asynchronous server: an event loop on the virtual clock (FedBuff, FedAsync).

Up to ``strategy.concurrency`` clients train at once. Whenever one finishes (on the virtual
clock, ``fedtune.devices.clock``) the server hears of it - however stale its update: the
server updates made since the client fetched its model - and a new client starts on the
current model: an available client that is not training, drawn from (run.seed, the count of
starts); with ``devices.arrival_rate`` the starts follow a Poisson process instead. The
strategy (``strategies.asynchronous``) says how many updates it takes before the global model
changes; a "round" of an asynchronous run - a metrics.csv row, a checkpoint, a listener's
``round_ended`` - is one server update.

Training runs at full speed, in batches, after the clock: who starts when, on which model,
and when each finishes depends only on the clock and the draws, never on what a client's
training yields - except how many of the updates heard count (a failed or rejected one does
not). So the loop first hears as many clients as the strategy still wants (``_hear``: each
assumed to count; a device that went offline before it finished is known not to), then trains
them (``_train``): one cohort call per model they started from (``phase.train_phase``, the
engines' cohort path, screening and the update bounds included; the call's number seeds their
batches, and a client heard twice from one model is in two calls). The strategy takes each
call's updates (``_take``) in the order they arrived: one by one (``receive_trained``), or,
for a strategy that ``takes_sums`` (FedBuff), as the call's sum, added where the clients
trained while each chunk of them was fresh (``CohortSpec.unit_weights``) - the clients of a
call all started from one model and are heard in one server update, so with one staleness.
Where some did not count, the loop hears more, until the strategy has what it wants: the same
clients, starts and server updates as hearing and training them one at a time. A client is
trained only once the server hears of it; the clients still in flight at the end of a run
never are.

Everything the loop holds between server updates - the table of clients in flight, the
models they started from, the clock, the counters - is plain attributes, which the checkpoint
keeps beside the strategy's buffer, so a resumed run continues bit for bit. The clients in
flight are one float64 table, a row per slot (``CLIENT`` ... ``LOST``), so starting one and
removing it touch one row; the next to finish is the top of a heap of (finish, client, slot)
beside the table, the lowest free slot the top of another (``AsyncRound._index``: rebuilt
from the table, so a checkpoint needs neither). A draw among one available client is no draw:
its seeded generator is made only when there is a choice (or a Poisson arrival to time);
devices that are always available are not asked at each start whether they are
(``_always_available``).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import numpy as np
from flwr.app import ConfigRecord, MetricRecord

from fedtune import protocol
from fedtune.config import Config
from fedtune.devices.clock import VirtualClock
from fedtune.devices.profiles import Diurnal
from fedtune.errors import ConfigError
from fedtune.results.run_dir import ClientRow, RoundRow
from fedtune.server.grid import CohortSpec, SimulatedGrid
from fedtune.server.guard import non_finite_tensors
from fedtune.server.phases import EvaluatePhase, UpdateBounds, evaluate_phase, train_phase
from fedtune.server.reports import TRAIN, ClientReport, client_row
from fedtune.server.round import (
    FederatedRun,
    RoundOutcome,
    evaluate_global,
    example_weighted,
    seed_sampling,
)
from fedtune.server.screening import reply_limits
from fedtune.server.summing import sum_updates, weighted_metrics
from fedtune.train import TEST_COLUMNS, EvalResult
from strategies.asynchronous import AsynchronousStrategy

_NO_CLIENTS = np.zeros(0, dtype=np.int64)
# the columns of the table of clients in flight (float64: ids and versions are exact)
CLIENT, START, FINISH, VERSION, LOST = range(5)
_FREE = np.array([-1.0, 0.0, np.inf, -1.0, 0.0])  # a free slot: nobody, never


class Heard(NamedTuple):
    """A client the server heard of: when it started and finished on the virtual clock, the
    server update (version) whose model it started from, and whether its device went offline
    before it finished (no update)."""

    client: int
    start: float
    finish: float
    version: int
    lost: bool


class Call(NamedTuple):
    """One training call of a server update: clients heard of that started from one model."""

    version: int
    heard: list[int]  # indices into the server update's heard clients, in arrival order


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
        self.busy = np.zeros(clock.profiles.num_clients, dtype=bool)  # by client id
        self.flying = 0  # clients in flight
        # str(version) -> the model (read-only arrays) of that server update, while a client
        # in flight started from it
        self.models: dict[str, dict[str, np.ndarray]] = {}

    # --- starting clients ------------------------------------------------------------------

    def _draw(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 28, self.starts])

    def next_start(self, clock: VirtualClock) -> tuple[float, np.ndarray]:
        """When the next client may start and the clients available then (none: no slot)."""
        if self.flying >= len(self.flight):
            return np.inf, _NO_CLIENTS
        moment = max(self.now, self.next_arrival) if self.arrival_rate else self.now
        idle = (~self.busy).nonzero()[0]  # np.flatnonzero's, without its wrapper's cost
        if not len(idle):
            return np.inf, _NO_CLIENTS
        if _always_available(clock):
            return moment, idle
        available = idle[clock.available(idle, moment)]
        if not len(available):
            moment = float(clock.next_available(idle, moment).min()) + 1e-6
            available = idle[clock.available(idle, moment)]
        return moment, available

    def start_client(self, clock: VirtualClock, moment: float, available: np.ndarray,
                     version: int, durations: np.ndarray, slot: int) -> tuple[float, int, int]:
        """One client starts at ``moment`` on model ``version`` in the free ``slot`` (the
        lowest: ``AsyncRound``'s heap of them); ``durations``: every client's virtual
        duration, ``VirtualClock.durations``. Its (finish, client, slot)."""
        # a draw among one candidate picks it: the generator (seeded afresh per start) is
        # made only when it draws something
        rng = self._draw() if self.arrival_rate or len(available) > 1 else None
        client = int(available[0]) if rng is None else int(rng.choice(available))
        self.starts += 1
        if rng is not None and self.arrival_rate:
            self.next_arrival = moment + float(rng.exponential(1.0 / self.arrival_rate))
        self.now = moment
        finish = moment + float(durations[client])
        offline = np.inf if _always_available(clock) else float(
            clock.online_until(np.array([client]), moment)[0])
        lost = finish > offline  # its work never reaches the server: never trained
        finish = min(finish, offline)
        self.flight[slot] = (client, moment, finish, version, lost)
        self.busy[client] = True
        self.flying += 1
        return finish, client, slot

    def finishing(self) -> list[tuple[float, int, int]]:
        """The clients in flight as a heap of (finish, client, slot): its first is the client
        the server hears of next (earliest; ties by client id)."""
        taken = np.flatnonzero(self.flight[:, CLIENT] >= 0)
        heap = [(float(self.flight[slot, FINISH]), int(self.flight[slot, CLIENT]), int(slot))
                for slot in taken]
        heapq.heapify(heap)
        return heap

    def pop(self, slot: int) -> Heard:
        """Free a slot: the client that was in it."""
        client, start, finish, version, lost = self.flight[slot].tolist()
        self.flight[slot] = _FREE
        self.busy[int(client)] = False
        self.flying -= 1
        return Heard(int(client), start, finish, int(version), bool(lost))

    def keep_models_in_flight(self) -> None:
        """Forget the models no client in flight started from."""
        flying = self.flight[self.flight[:, CLIENT] >= 0, VERSION]
        versions = {str(int(version)) for version in np.unique(flying)}
        self.models = {key: model for key, model in self.models.items() if key in versions}


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
        # restored it), so a checkpoint needs neither: its clients by finish
        # (``AsyncLoop.finishing``) and its free slots (a heap: the lowest is taken)
        self.finishing: list[tuple[float, int, int]] = []
        self.free: list[int] = []
        self.indexed = False

    def _index(self) -> None:
        """Build what is kept beside the table (``__init__``) from it."""
        self.finishing = self.loop.finishing()
        self.free = np.flatnonzero(self.loop.flight[:, CLIENT] < 0).tolist()  # a heap
        self.indexed = True

    def __call__(self, run: FederatedRun, server_round: int) -> RoundOutcome:
        """Run the event loop until the strategy updates the global model once."""
        loop, strategy = self.loop, self.strategy
        began = time.perf_counter()
        version = server_round - 1  # server updates made so far
        durations = self._durations(run.state.arrays.count_bytes())
        loop.models.setdefault(str(version), _read_only(protocol.to_numpy(run.state.arrays)))
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
        while True:
            # hear no more than could all come to nothing before the patience runs out
            heard = self._hear(version, durations, strategy.wanted(), patience - fruitless)
            reports = self._train(server_round, version, heard, totals)
            fruitless = self._take(server_round, version, heard, reports, rows, accepted,
                                   fruitless)
            if fruitless >= patience:
                run.state.rounds_without_update += 1
                model_update = f"kept: no update from the last {fruitless} clients"
                break
            if strategy.wanted() <= 0:
                break
        loop.keep_models_in_flight()
        model_update = model_update or self._release()
        return self._outcome(server_round, rows, accepted, totals, model_update, began)

    def _hear(self, version: int, durations: np.ndarray, wanted: int, room: int
              ) -> list[Heard]:
        """Start and hear clients on the clock until ``wanted`` of those heard may bring an
        update (all but the offline ones), or ``room`` are heard."""
        loop, finishing, free = self.loop, self.finishing, self.free
        heard: list[Heard] = []
        hopeful = 0
        while True:
            moment, available = loop.next_start(self.clock)
            if len(available) and (not finishing or moment <= finishing[0][0]):
                heapq.heappush(finishing, loop.start_client(
                    self.clock, moment, available, version, durations, heapq.heappop(free)))
                continue
            if not finishing:
                raise RuntimeError("devices: no client is ever available to start")
            slot = heapq.heappop(finishing)[2]
            client = loop.pop(slot)
            heapq.heappush(free, slot)
            loop.now = client.finish
            heard.append(client)
            hopeful += not client.lost
            if hopeful >= wanted or len(heard) >= room:
                return heard

    def _train(self, server_round: int, version: int, heard: list[Heard],
               totals: dict[str, int]) -> dict[int, tuple[ClientReport, Any]]:
        """Train the ``heard`` clients that may bring an update, one cohort call per model
        they started from (``_calls``). Each one's report, by its index in ``heard``; beside
        the first of a call's clients, for a strategy that ``takes_sums``, the call's sum and
        count (None where no update counted); else beside each accepted one its trained
        model."""
        loop, state, config = self.loop, self.run.state, self.run.config
        reports: dict[int, tuple[ClientReport, Any]] = {}
        sums = self.strategy.takes_sums
        for call in _calls(heard):
            arrays = (state.arrays if call.version == version
                      else protocol.to_array_record(loop.models[str(call.version)]))
            clients = sorted(heard[i].client for i in call.heard)
            messages = self.strategy.start_messages(call.version + 1, arrays,
                                                    [self.node_of(c) for c in clients],
                                                    loop.dispatches)
            loop.dispatches += 1
            bounds = UpdateBounds(arrays, config.strategy.max_update_norm,
                                  config.strategy.update_norm_z)
            # the guard needs each update: a bounded call is summed here, after it
            spec = CohortSpec(weighted_mean=sums and not bounds.active, limits=self.limits,
                              unit_weights=True)
            train = train_phase(
                self.run.grid, messages, spec, call.version + 1, self.run.identities, bounds,
                config.strategy.round_timeout_s,
                lambda done, total: self.run.progress(server_round, "train", done, total),
                self.run.stop)
            totals["bytes_up"] += train.bytes_up
            totals["bytes_down"] += train.bytes_down
            totals["dropped"] += train.dropped
            by_client = {report.client_id: report for report in train.reports}
            for i in call.heard:
                report = by_client[heard[i].client]
                kept = (_trained(report) if report.status == "ok" and not sums else None)
                reports[i] = report, kept
            if sums:
                ok = train.accepted_reports
                summed = train.summed or (sum_updates(ok, [_trained(r) for r in ok], True)
                                          if ok else None)
                reports[call.heard[0]] = reports[call.heard[0]][0], summed
        return reports

    def _take(self, server_round: int, version: int, heard: list[Heard],
              reports: dict[int, tuple[ClientReport, Any]], rows: list[ClientRow],
              accepted: list[dict[str, Any]], fruitless: int) -> int:
        """Hand the strategy the ``heard`` clients' updates in the order they arrived (a
        strategy that ``takes_sums``: each call's sum, refusing none); their clients.csv rows
        and accepted metrics go to ``rows`` and ``accepted``. The count of clients heard in a
        row without an update, from ``fruitless`` on."""
        strategy, models = self.strategy, self.loop.models
        for i, client in enumerate(heard):
            staleness = version - client.version
            if client.lost:
                rows.append(ClientRow(server_round, client.client, None, None, None, None,
                                      "offline", "the device went offline before it finished",
                                      virtual_start_s=client.start,
                                      virtual_duration_s=client.finish - client.start))
                fruitless += 1
                continue
            report, kept = reports[i]
            row = client_row(server_round, TRAIN, report)
            row.virtual_start_s = client.start
            row.virtual_duration_s = client.finish - client.start
            row.staleness = staleness
            rows.append(row)
            start = models[str(client.version)]
            if strategy.takes_sums and kept is not None:
                strategy.receive_sum(start, kept.total, int(kept.weight), staleness)
            ok = report.status == "ok"
            refused = strategy.refuses(client.client) if ok and not strategy.takes_sums else ""
            if refused:  # central DP: its update is already in this buffer
                row.status, row.reason, ok = "rejected", refused, False
            if not ok:  # failed, rejected, declined: nothing arrives
                fruitless += 1
                continue
            fruitless = 0
            metrics: dict[str, Any] = {protocol.NUM_EXAMPLES: row.num_examples or 0}
            if row.train_loss is not None:  # none: the client saw no example
                metrics[protocol.TRAIN_LOSS] = row.train_loss
            accepted.append(metrics)
            if not strategy.takes_sums:
                strategy.receive_trained(start, kept, staleness, float(row.num_examples or 0),
                                         client.client)
        return fruitless

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



def _calls(heard: list[Heard]) -> list[Call]:
    """The training calls of ``heard``'s clients that may bring an update: one per model they
    started from (by version), a client heard twice from one model in as many calls, each
    call's clients in arrival order; ordered by version, then by when their first client
    arrived (the order their numbers seed them in)."""
    calls: list[tuple[Call, set[int]]] = []
    by_version: dict[int, list[int]] = {}  # version -> its calls' places in ``calls``
    for i, client in enumerate(heard):
        if client.lost:
            continue
        places = by_version.setdefault(client.version, [])
        place = next((p for p in places if client.client not in calls[p][1]), None)
        if place is None:
            place = len(calls)
            places.append(place)
            calls.append((Call(client.version, []), set()))
        calls[place][0].heard.append(i)
        calls[place][1].add(client.client)
    return [calls[p][0] for version in sorted(by_version) for p in by_version[version]]

def _read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only copies of ``arrays`` that own their data (the checkpoint captured after every
    server update keeps them without a copy)."""
    copies = {name: np.array(value, order="C") for name, value in arrays.items()}
    for copy in copies.values():
        copy.flags.writeable = False
    return copies


def _trained(report: ClientReport) -> Mapping[str, np.ndarray]:
    """An accepted client's trained model: kept one by one by a cohort, or its reply."""
    if report.update is not None:
        return report.update[protocol.ARRAYS]
    assert report.reply is not None  # the message path keeps the accepted reply
    return protocol.to_numpy(report.reply.content[protocol.ARRAYS])

