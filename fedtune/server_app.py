"""Flower ServerApp: builds the strategy, runs the rounds, hands every result to results/.

Each round: the strategy configures training, replies are collected (``rounds.exchange``),
the strategy aggregates; then federated evaluation on the clients' local test splits, and the
server evaluates the new global model on the held-out global test set. One metrics row and one
row per sampled client are appended to the run directory before the next round starts.
"""

from __future__ import annotations

from logging import INFO
import math
import random
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
from flwr.common import log
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtune.checkpoint import read_checkpoint
from fedtune.client_app import PARTITION_KEY, STATUS_KEY, to_array_record
from fedtune.config import Config, ConfigError, from_run_config
from fedtune.engine.fold import FOLDED_KEY, folded_mean
from fedtune.models.build import build_model, load_shared_state, save_model, shared_state
from fedtune.privacy.central import CentralBudget
from fedtune.resume import Checkpointer, check_resumable
from fedtune.results.plots import plot_accuracy_loss, plot_epsilon, plot_partitions
from fedtune.results.run_dir import ClientRow, RoundRow, RunDirectory
from fedtune.results.summary import build_summary
from fedtune.rounds import Exchange, exchange
from fedtune.strategy_factory import build_strategy
from fedtune.task import TaskResources, task_resources
from fedtune.train import EvalResult, evaluate
from fedtune.validation import (
    check_evaluate_reply,
    check_folded_train_reply,
    check_train_reply,
)

class Reporter(Protocol):
    """Receives progress; the CLI draws it, ``LogReporter`` logs it."""

    def start(self, config: Config, run_dir: RunDirectory) -> None: ...

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None: ...

    def round_end(self, row: RoundRow) -> None: ...

    def finish(self, summary: dict[str, Any], run_dir: RunDirectory) -> None: ...


class LogReporter:
    """Progress as log lines (for ``flwr run``, where fedtune owns no terminal)."""

    def start(self, config: Config, run_dir: RunDirectory) -> None:
        log(INFO, "fedtune: %d rounds, %d clients, run directory %s", config.run.rounds,
                    config.data.num_clients, run_dir.path)

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        if done == total:
            log(INFO, "round %d: %s replies %d/%d", server_round, phase, done, total)

    def round_end(self, row: RoundRow) -> None:
        log(INFO, "round %d: train_loss %.4f  test_acc %.4f  test_f1 %.4f  %.1fs",
                    row.round, _nan(row.train_loss), _nan(row.eval_accuracy),
                    _nan(row.eval_macro_f1), row.wall_s)

    def finish(self, summary: dict[str, Any], run_dir: RunDirectory) -> None:
        log(INFO, "fedtune: finished, results in %s", run_dir.path)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


class NodesMissing(ConfigError):
    """Fewer nodes connected than data.num_clients within engine.node_wait_s."""


def wait_for_nodes(grid: Grid, needed: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() > deadline:
            raise NodesMissing(
                f"data.num_clients = {needed} but only {len(nodes)} client nodes connected "
                f"within engine.node_wait_s = {wait_s:g}s: start {needed} SuperNodes (for "
                f"`flwr run`, set options.num-supernodes = {needed} in the SuperLink "
                "connection) or lower data.num_clients"
            )
        time.sleep(0.5)


def same_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of ``like``: Flower's FedOpt strategies (FedAdam, FedYogi,
    FedAdagrad) return float64 for a float32 model, which clients would then have to answer."""
    if all(arrays[name].dtype == like[name].dtype for name in arrays.keys() if name in like):
        return arrays
    return to_array_record({name: array.numpy().astype(np.dtype(like[name].dtype), copy=False)
                            if name in like else array.numpy()
                            for name, array in arrays.items()})


def _arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def evaluate_global(resources: TaskResources, arrays: ArrayRecord,
                    with_report: bool = False) -> EvalResult:
    """Server-side evaluation of global weights on the held-out global test set."""
    model = resources.model
    load_shared_state(model, _arrays_to_numpy(arrays))
    labels = resources.federation.data.label_names if with_report else None
    return evaluate(model, resources.global_test_loader(), resources.device, labels)


def _metric(message: Message, key: str) -> Any:
    # the first MetricRecord, found without RecordDict.metric_records (which copies them all)
    record = next(r for r in message.content.values() if isinstance(r, MetricRecord))
    return record.get(key)


def declined_reason(reply: Message, max_examples: int) -> str | None:
    """Why a client sent no update on purpose (its local privacy budget is spent), when its
    reply is otherwise sound; None for any other reply."""
    status = reply.content.config_records.get(STATUS_KEY)
    if (reply.content.array_records or status is None or not status["reason"]
            or check_evaluate_reply(reply, max_examples) is not None
            or not isinstance(_metric(reply, PARTITION_KEY), int)):
        return None
    return str(status["reason"])


def screen_train_replies(train: Exchange, max_examples: int
                         ) -> tuple[list[Message], list[tuple[Message, str]],
                                    list[tuple[Message, str]]]:
    """(accepted replies, [(declined reply, reason)], [(rejected reply, reason)])."""
    accepted, declined, rejected = [], [], []
    for reply in train.ok:
        reason = declined_reason(reply, max_examples)
        if reason is not None:
            declined.append((reply, reason))
            continue
        if FOLDED_KEY in reply.content:  # its arrays were screened on the actor, then summed
            reason = check_folded_train_reply(reply, max_examples)
        else:
            reason = check_train_reply(train.instruction(reply), reply, max_examples)
        if reason is None and not isinstance(_metric(reply, PARTITION_KEY), int):
            reason = f"{PARTITION_KEY} is not an integer"
        if reason is None:
            accepted.append(reply)
        else:
            rejected.append((reply, reason))
    return accepted, declined, rejected


def _reply_row(server_round: int, reply: Message, status: str, reason: str,
               node_to_client: dict[int, int]) -> ClientRow:
    client_id = int(_metric(reply, PARTITION_KEY))
    node_to_client[reply.metadata.src_node_id] = client_id
    epsilon, loss = _metric(reply, "epsilon"), _metric(reply, "train_loss")
    return ClientRow(server_round, client_id, int(_metric(reply, "num-examples")),
                     None if loss is None else float(loss),
                     None if epsilon is None else float(epsilon),
                     float(_metric(reply, "duration-s")), status, reason)


def client_rows(server_round: int, train: Exchange, accepted: list[Message],
                declined: list[tuple[Message, str]], rejected: list[tuple[Message, str]],
                node_to_client: dict[int, int]) -> list[ClientRow]:
    """One row per sampled client: ok, rejected (bad reply, or no update because its privacy
    budget is spent), failed (error reply) or timeout (no reply)."""
    rows = [_reply_row(server_round, reply, "ok", "", node_to_client) for reply in accepted]
    rows += [_reply_row(server_round, reply, "rejected", reason, node_to_client)
             for reply, reason in declined]
    for reply, reason in rejected:
        rows.append(ClientRow(server_round, node_to_client.get(reply.metadata.src_node_id),
                              None, None, None, None, "rejected", reason))
    for reply in train.failed:
        node = reply.metadata.src_node_id
        reason = _last_line(reply.error.reason)
        # an expired reply (a SuperLink's code; the Ray engine's for engine.client_timeout_s)
        status = "timeout" if reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE else "failed"
        rows.append(ClientRow(server_round, node_to_client.get(node), None, None, None, None,
                              status, reason))
    for node in train.timed_out:
        rows.append(ClientRow(server_round, node_to_client.get(node), None, None, None, None,
                              "timeout", "no reply within strategy.round_timeout_s"))
    return sorted(rows, key=lambda r: (r.client_id is None, r.client_id or 0))


def seed_sampling(seed: int, server_round: int, phase: str) -> None:
    """Seed `random` right before a strategy samples nodes (Flower samples with it), so the
    choice depends on (seed, round, phase) only, not on what else used `random` meanwhile."""
    random.seed(f"{seed}-{server_round}-{phase}")


def by_client(replies: list[Message]) -> list[Message]:
    """Replies in client order: float sums then do not depend on arrival order."""
    return sorted(replies, key=lambda reply: int(_metric(reply, PARTITION_KEY)))


def _last_line(text: str) -> str:
    """The exception line of a client's error (Ray wraps it in several tracebacks)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:400]
    return (lines[-1] if lines else "unknown error")[:400]


def max_client_epsilon(client_epsilons: dict[int, float], rows: list[ClientRow]) -> float | None:
    """Record each client's latest ε; the largest over every client so far (local DP)."""
    for row in rows:
        if row.epsilon is not None and row.client_id is not None:
            client_epsilons[row.client_id] = row.epsilon
    return max(client_epsilons.values()) if client_epsilons else None


def _weighted(messages: list[Message], key: str) -> float | None:
    weights = [float(_metric(m, "num-examples")) for m in messages]
    if not messages or sum(weights) == 0:
        return None
    values = [float(_metric(m, key)) for m in messages]
    return float(np.average(values, weights=weights))


@dataclass
class RoundState:
    """What the server carries from one round to the next (and what a checkpoint restores)."""

    arrays: ArrayRecord
    server_round: int = 0  # the last completed round
    rounds_without_update: int = 0
    elapsed_s: float = 0.0  # time spent in earlier sessions of a resumed run
    node_to_client: dict[int, int] = field(default_factory=dict)
    budget: CentralBudget | None = None  # central DP: the run's accountant
    client_epsilons: dict[int, float] = field(default_factory=dict)  # local DP: latest ε each
    stop_reason: str = ""  # why the run ended before run.rounds (privacy budget)


def _start_run(config: Config, resources: TaskResources, strategy: Any, grid: Grid
               ) -> tuple[RunDirectory, RoundState, Checkpointer]:
    """A new run directory and initial model, or the state a checkpoint saved (run.resume)."""
    if not config.run.resume:
        run_dir = RunDirectory.create(config, config.run.dir or None)
        histogram = resources.federation.label_histogram()
        run_dir.write_partitions(histogram, resources.federation.data.label_names)
        if len(histogram):  # with private per-party files the server sees no partitions
            plot_partitions(histogram, resources.federation.data.label_names,
                            run_dir.plots_dir / "partitions.png")
        # a fresh model: the resident one may hold weights of an earlier run in this process
        arrays = to_array_record(shared_state(build_model(resources.spec, config.run.seed)))
        state = RoundState(arrays, node_to_client=dict(getattr(grid, "node_to_client", {})),
                           budget=_central_budget(config))
        return run_dir, state, Checkpointer(run_dir.path, config, grid, _stateful(strategy, state))
    run_dir = RunDirectory.open(config)
    check_resumable(config)
    checkpoint = read_checkpoint(run_dir.path)
    run_dir.truncate_after(checkpoint.server_round)
    run_dir.write_config(config)  # run.rounds may have grown
    state = RoundState(
        to_array_record(checkpoint.global_arrays), checkpoint.server_round,
        int(checkpoint.counters["rounds_without_update"]),
        float(checkpoint.counters["elapsed_s"]),
        {int(node): client for node, client in checkpoint.counters["node_to_client"].items()},
        _central_budget(config),
        {int(client): value
         for client, value in checkpoint.counters["client_epsilons"].items()},
        checkpoint.counters["stop_reason"],
    )
    checkpointer = Checkpointer(run_dir.path, config, grid, _stateful(strategy, state))
    checkpointer.restore(checkpoint)
    log(INFO, "fedtune: resuming %s after round %d", run_dir.path, checkpoint.server_round)
    return run_dir, state, checkpointer


def _central_budget(config: Config) -> CentralBudget | None:
    return CentralBudget.from_config(config) if config.privacy.mode == "central" else None


def _stateful(strategy: Any, state: RoundState) -> SimpleNamespace:
    """The server objects whose attributes a checkpoint keeps."""
    return SimpleNamespace(strategy=strategy, budget=state.budget)


def run_federated(grid: Grid, config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None) -> RunDirectory:
    """Run every round of the configured federation on ``grid``; returns the run directory.

    Setting ``stop`` (from another thread) ends the run while it waits for replies, with
    ``RunStopped``. Whenever the run ends early, the last finished round is checkpointed.
    """
    reporter = reporter or LogReporter()
    torch.manual_seed(config.run.seed)
    resources = task_resources(config)
    strategy = build_strategy(config)
    run_dir, state, checkpointer = _start_run(config, resources, strategy, grid)
    reporter.start(config, run_dir)
    wait_for_nodes(grid, config.data.num_clients, config.engine.node_wait_s)
    started = time.perf_counter()
    final_eval: EvalResult | None = None
    try:
        for server_round in range(state.server_round + 1, config.run.rounds + 1):
            if state.stop_reason:
                break
            if state.budget is not None and not state.budget.next_round_fits():
                state.stop_reason = state.budget.stop_reason(server_round)
                break
            final_eval = _run_round(grid, config, resources, strategy, state, server_round,
                                    run_dir, reporter, stop)
            state.server_round = server_round
            checkpointer.round_end(state, time.perf_counter() - started)
    except BaseException:
        checkpointer.save_latest()
        raise
    if final_eval is None:  # resumed after the last round: evaluate what the checkpoint holds
        final_eval = evaluate_global(resources, state.arrays, with_report=True)
    if state.stop_reason:
        log(INFO, "fedtune: %s", state.stop_reason)
    load_shared_state(resources.model, _arrays_to_numpy(state.arrays))
    save_model(resources.model, resources.spec, run_dir.model_dir)
    plot_accuracy_loss(run_dir.metrics(), run_dir.plots_dir / "accuracy_loss.png")
    if config.privacy.mode != "none":
        plot_epsilon(run_dir.metrics(), config.privacy.target_epsilon,
                     run_dir.plots_dir / "epsilon.png")
    summary = build_summary(config, resources, run_dir, final_eval,
                            state.elapsed_s + time.perf_counter() - started, state.stop_reason)
    run_dir.write_json("summary.json", summary)
    reporter.finish(summary, run_dir)
    return run_dir


def _run_round(grid: Grid, config: Config, resources: TaskResources, strategy: Any,
               state: RoundState, server_round: int, run_dir: RunDirectory, reporter: Reporter,
               stop: threading.Event | None) -> EvalResult:
    """Train, aggregate, evaluate and record one round; updates ``state`` in place."""
    round_start = time.perf_counter()
    timeout = config.strategy.round_timeout_s
    # a reply may not claim more examples than the federation has (unknown for private files)
    max_train_examples = resources.max_train_examples()
    max_test_examples = resources.max_test_examples()

    def progress(done: int, total: int, phase: str = "train") -> None:
        reporter.phase(server_round, phase, done, total)

    seed_sampling(config.run.seed, server_round, "train")
    train = exchange(grid, strategy.configure_train(server_round, state.arrays, ConfigRecord(),
                                                    grid), timeout, progress, stop)
    accepted, declined, rejected = screen_train_replies(train, max_train_examples)
    rows = client_rows(server_round, train, accepted, declined, rejected, state.node_to_client)
    budget = state.budget
    if train.sent and len(declined) == len(train.sent):
        state.stop_reason = (f"privacy budget: every client sampled in round {server_round} "
                             "has spent its budget")
    # DP-FedAvg releases a noised update every round, even from an empty Poisson cohort:
    # its accountant counts every round
    elif budget is not None or (
            len(accepted) >= min(config.strategy.min_train_clients, len(train.sent)) > 0):
        state.rounds_without_update = 0
        if config.engine.aggregate_on_actors:  # the actors summed the updates already
            new_arrays = folded_mean(accepted)
        else:
            new_arrays, _ = strategy.aggregate_train(server_round, by_client(accepted))
        if new_arrays is not None:
            state.arrays = same_dtypes(new_arrays, state.arrays)
    else:  # too few sound updates: the global model stays as it was this round
        state.rounds_without_update += 1
        if state.rounds_without_update >= config.run.max_rounds_without_update:
            reasons = "; ".join(sorted({r.reason for r in rows if r.reason}))[:1000]
            raise RuntimeError(
                f"round {server_round}: {state.rounds_without_update} rounds in a row without "
                f"enough sound client updates (run.max_rounds_without_update); last "
                f"reasons: {reasons}")
    if budget is not None:
        budget.record_round()

    seed_sampling(config.run.seed, server_round, "evaluate")
    federated = exchange(
        grid, strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), grid),
        timeout, lambda done, total: progress(done, total, "evaluate"), stop,
    )
    sound_evaluations = [r for r in federated.ok
                         if check_evaluate_reply(r, max_test_examples) is None]
    last = (server_round == config.run.rounds or bool(state.stop_reason)
            or (budget is not None and not budget.next_round_fits()))
    global_eval = evaluate_global(resources, state.arrays, with_report=last)
    row = RoundRow(
        round=server_round,
        train_loss=_weighted(accepted, "train_loss"),
        eval_loss=global_eval.loss,
        eval_accuracy=global_eval.accuracy,
        eval_macro_f1=global_eval.macro_f1,
        epsilon=None if budget is None else budget.epsilon,
        max_client_epsilon=max_client_epsilon(state.client_epsilons, rows),
        clients_sampled=len(train.sent),
        clients_ok=len(accepted),
        clients_failed=len(train.sent) - len(accepted),
        bytes_up=train.bytes_up + federated.bytes_up,
        bytes_down=train.bytes_down + federated.bytes_down,
        wall_s=time.perf_counter() - round_start,
        federated_eval_loss=_weighted(sound_evaluations, "eval_loss"),
        federated_eval_accuracy=_weighted(sound_evaluations, "eval_accuracy"),
    )
    run_dir.append_round(row, rows)
    reporter.round_end(row)
    return global_eval


def make_server_app(reporter: Reporter | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that reads its config from the run config (Flower's or fedtune's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, from_run_config(context.run_config), reporter, stop)

    return server_app


app = make_server_app()
