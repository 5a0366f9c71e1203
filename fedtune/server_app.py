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
from typing import Any, Protocol

import numpy as np
import torch
from flwr.common import log
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtune.client_app import PARTITION_KEY, to_array_record
from fedtune.config import Config, ConfigError, from_run_config
from fedtune.engine.fold import FOLDED_KEY, folded_mean
from fedtune.models.build import build_model, load_shared_state, save_model, shared_state
from fedtune.results.plots import plot_accuracy_loss, plot_partitions
from fedtune.results.run_dir import ClientRow, RoundRow, RunDirectory
from fedtune.results.summary import build_summary
from fedtune.rounds import Exchange, exchange
from fedtune.strategy_factory import build_strategy
from fedtune.task import TaskResources, task_resources
from fedtune.train import EvalResult, evaluate
from fedtune.validation import (
    MAX_ANY_EXAMPLES,
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


def screen_train_replies(train: Exchange, max_examples: int
                         ) -> tuple[list[Message], list[tuple[Message, str]]]:
    """(accepted replies, [(rejected reply, reason)])."""
    accepted, rejected = [], []
    for reply in train.ok:
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
    return accepted, rejected


def client_rows(server_round: int, train: Exchange, accepted: list[Message],
                rejected: list[tuple[Message, str]], node_to_client: dict[int, int]
                ) -> list[ClientRow]:
    """One row per sampled client: ok, rejected (bad reply), failed (error), timeout."""
    rows = []
    for reply in accepted:
        client_id = int(_metric(reply, PARTITION_KEY))
        node_to_client[reply.metadata.src_node_id] = client_id
        rows.append(ClientRow(server_round, client_id, int(_metric(reply, "num-examples")),
                              float(_metric(reply, "train_loss")), None,
                              float(_metric(reply, "duration-s")), "ok"))
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


def _weighted(messages: list[Message], key: str) -> float | None:
    weights = [float(_metric(m, "num-examples")) for m in messages]
    if not messages or sum(weights) == 0:
        return None
    values = [float(_metric(m, key)) for m in messages]
    return float(np.average(values, weights=weights))


def run_federated(grid: Grid, config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None) -> RunDirectory:
    """Run every round of the configured federation on ``grid``; returns the run directory.

    Setting ``stop`` (from another thread) ends the run while it waits for replies.
    """
    reporter = reporter or LogReporter()
    torch.manual_seed(config.run.seed)
    resources = task_resources(config)
    run_dir = RunDirectory.create(config, config.run.dir or None)
    histogram = resources.federation.label_histogram()
    run_dir.write_partitions(histogram, resources.federation.data.label_names)
    if len(histogram):  # with private per-party files the server sees no partitions
        plot_partitions(histogram, resources.federation.data.label_names,
                        run_dir.plots_dir / "partitions.png")
    reporter.start(config, run_dir)
    started = time.perf_counter()
    wait_for_nodes(grid, config.data.num_clients, config.engine.node_wait_s)
    node_to_client: dict[int, int] = dict(getattr(grid, "node_to_client", {}))

    strategy = build_strategy(config)
    # a fresh model: the resident one may hold weights of an earlier run in this process
    arrays = to_array_record(shared_state(build_model(resources.spec, config.run.seed)))
    timeout = config.strategy.round_timeout_s
    federation = resources.federation
    # a reply may not claim more examples than the federation has (unknown for private files)
    max_train_examples = resources.max_train_examples()
    max_test_examples = sum(map(len, federation.client_test_rows)) or MAX_ANY_EXAMPLES
    rounds_without_update = 0
    final_eval: EvalResult | None = None
    for server_round in range(1, config.run.rounds + 1):
        round_start = time.perf_counter()

        def progress(done: int, total: int, phase: str = "train") -> None:
            reporter.phase(server_round, phase, done, total)

        seed_sampling(config.run.seed, server_round, "train")
        train = exchange(grid, strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
                         timeout, progress, stop)
        accepted, rejected = screen_train_replies(train, max_train_examples)
        rows = client_rows(server_round, train, accepted, rejected, node_to_client)
        if len(accepted) >= min(config.strategy.min_train_clients, len(train.sent)) > 0:
            rounds_without_update = 0
            if config.engine.aggregate_on_actors:  # the actors summed the updates already
                new_arrays = folded_mean(accepted)
            else:
                new_arrays, _ = strategy.aggregate_train(server_round, by_client(accepted))
            if new_arrays is not None:
                arrays = new_arrays
        else:  # too few sound updates: the global model stays as it was this round
            rounds_without_update += 1
            if rounds_without_update >= config.run.max_rounds_without_update:
                reasons = "; ".join(sorted({r.reason for r in rows if r.reason}))[:1000]
                raise RuntimeError(
                    f"round {server_round}: {rounds_without_update} rounds in a row without "
                    f"enough sound client updates (run.max_rounds_without_update); last "
                    f"reasons: {reasons}")

        seed_sampling(config.run.seed, server_round, "evaluate")
        federated = exchange(
            grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout,
            lambda done, total: progress(done, total, "evaluate"), stop,
        )
        sound_evaluations = [r for r in federated.ok
                             if check_evaluate_reply(r, max_test_examples) is None]
        last = server_round == config.run.rounds
        final_eval = evaluate_global(resources, arrays, with_report=last)
        row = RoundRow(
            round=server_round,
            train_loss=_weighted(accepted, "train_loss"),
            eval_loss=final_eval.loss,
            eval_accuracy=final_eval.accuracy,
            eval_macro_f1=final_eval.macro_f1,
            epsilon=None,
            max_client_epsilon=None,
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

    load_shared_state(resources.model, _arrays_to_numpy(arrays))
    save_model(resources.model, resources.spec, run_dir.model_dir)
    plot_accuracy_loss(run_dir.metrics(), run_dir.plots_dir / "accuracy_loss.png")
    summary = build_summary(config, resources, run_dir, final_eval,
                            time.perf_counter() - started)
    run_dir.write_json("summary.json", summary)
    reporter.finish(summary, run_dir)
    return run_dir


def make_server_app(reporter: Reporter | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that reads its config from the run config (Flower's or fedtune's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, from_run_config(context.run_config), reporter, stop)

    return server_app


app = make_server_app()
