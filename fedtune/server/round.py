"""One federated round, as Flower's strategies shape it: configure -> send -> aggregate.

``play_round`` asks the strategy for the train messages, exchanges them, screens the replies,
aggregates the sound ones into the new global model (or keeps the old one when too few are
sound), lets the privacy mode account for the round, runs federated evaluation on the clients'
local test splits and evaluates the new global model on the held-out global test set. It
returns what happened (``RoundOutcome``); writing rows, checkpoints, progress and stop rules
are the listeners' business (``fedtune.server.listeners``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.config import Config
from fedtune.models.weights import load_shared_state
from fedtune.privacy.mode import PrivacyServer
from fedtune.results.run_dir import ClientRow, RoundRow
from fedtune.server.exchange import Exchange, exchange
from fedtune.server.screening import ScreenedReplies, check_evaluate_reply, screen_train_replies
from fedtune.server.state import RoundState
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources
from fedtune.train import EvalResult, evaluate

Progress = Callable[[int, str, int, int], None]  # (round, phase, done, total)


@dataclass
class FederatedRun:
    """Everything the rounds of one run share (the loop and its listeners read it)."""

    config: Config
    grid: Grid
    resources: TaskResources
    strategy: Strategy
    privacy: PrivacyServer
    state: RoundState
    progress: Progress
    stop: threading.Event | None = None
    started: float = 0.0  # perf_counter() when this session's rounds began


@dataclass
class RoundOutcome:
    """What happened in one round."""

    row: RoundRow  # its metrics.csv line
    clients: list[ClientRow]  # one clients.csv line per sampled client
    evaluation: EvalResult  # the new global model on the global test set
    train_metrics: MetricRecord | None  # the strategy's aggregate of the train replies
    sampled: int
    declined: int  # clients that sent no update because their privacy budget is spent


def same_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of ``like``: Flower's FedOpt strategies (FedAdam, FedYogi,
    FedAdagrad) return float64 for a float32 model, which clients would then have to answer."""
    if all(arrays[name].dtype == like[name].dtype for name in arrays.keys() if name in like):
        return arrays
    return protocol.to_array_record({
        name: array.numpy().astype(np.dtype(like[name].dtype), copy=False)
        if name in like else array.numpy() for name, array in arrays.items()})


def evaluate_global(resources: TaskResources, arrays: ArrayRecord) -> EvalResult:
    """Server-side evaluation of global weights on the held-out global test set."""
    model = resources.model
    load_shared_state(model, protocol.to_numpy(arrays))
    return evaluate(model, resources.global_test_loader(), resources.device)


def seed_sampling(seed: int, server_round: int, phase: str) -> None:
    """Seed `random` right before a strategy samples nodes (Flower samples with it), so the
    choice depends on (seed, round, phase) only, not on what else used `random` meanwhile."""
    random.seed(f"{seed}-{server_round}-{phase}")


def by_client(replies: list[Message]) -> list[Message]:
    """Replies in client order: float sums then do not depend on arrival order."""
    return sorted(replies, key=lambda reply: int(protocol.metric(reply, protocol.PARTITION_ID)))


def _last_line(text: str) -> str:
    """The exception line of a client's error (Ray wraps it in several tracebacks)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:400]
    return (lines[-1] if lines else "unknown error")[:400]


def _weighted(messages: list[Message], key: str) -> float | None:
    weights = [float(protocol.metric(m, protocol.NUM_EXAMPLES)) for m in messages]
    if not messages or sum(weights) == 0:
        return None
    values = [float(protocol.metric(m, key)) for m in messages]
    return float(np.average(values, weights=weights))


def _reply_row(server_round: int, reply: Message, status: str, reason: str,
               node_to_client: dict[int, int]) -> ClientRow:
    client_id = int(protocol.metric(reply, protocol.PARTITION_ID))
    node_to_client[reply.metadata.src_node_id] = client_id
    epsilon = protocol.metric(reply, protocol.EPSILON)
    loss = protocol.metric(reply, protocol.TRAIN_LOSS)
    trained = protocol.metric(reply, protocol.EXAMPLES_SEEN)
    return ClientRow(server_round, client_id,
                     int(protocol.metric(reply, protocol.NUM_EXAMPLES)),
                     None if loss is None else float(loss),
                     None if epsilon is None else float(epsilon),
                     float(protocol.metric(reply, protocol.DURATION_S)), status, reason,
                     None if trained is None else int(trained))


def client_rows(server_round: int, train: Exchange, screened: ScreenedReplies,
                node_to_client: dict[int, int]) -> list[ClientRow]:
    """One row per sampled client: ok, rejected (bad reply, or no update because its privacy
    budget is spent), failed (error reply) or timeout (no reply)."""
    rows = [_reply_row(server_round, reply, "ok", "", node_to_client)
            for reply in screened.accepted]
    rows += [_reply_row(server_round, reply, "rejected", reason, node_to_client)
             for reply, reason in screened.declined]
    for reply, reason in screened.rejected:
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


def play_round(run: FederatedRun, server_round: int) -> RoundOutcome:
    """Train, aggregate, account and evaluate one round; updates ``run.state`` in place."""
    config, state, strategy, privacy = run.config, run.state, run.strategy, run.privacy
    round_start = time.perf_counter()
    timeout = config.strategy.round_timeout_s
    # a reply may not claim more examples than the federation has (unknown for private files)
    max_train_examples = run.resources.max_train_examples()
    max_test_examples = run.resources.max_test_examples()

    def progress(phase: str) -> Callable[[int, int], None]:
        return lambda done, total: run.progress(server_round, phase, done, total)

    seed_sampling(config.run.seed, server_round, "train")
    train = exchange(run.grid, strategy.configure_train(server_round, state.arrays,
                                                        ConfigRecord(), run.grid),
                     timeout, progress("train"), run.stop)
    screened = screen_train_replies(train, max_train_examples,
                                    STRATEGIES[config.strategy.name].answers,
                                    privacy.accepts_declines)
    accepted = screened.accepted
    rows = client_rows(server_round, train, screened, state.node_to_client)
    train_metrics: MetricRecord | None = None
    all_declined = bool(train.sent) and len(screened.declined) == len(train.sent)
    # DP-FedAvg releases a noised update every round, even from an empty Poisson cohort
    if not all_declined and (privacy.releases_empty_rounds or (
            len(accepted) >= min(config.strategy.min_train_clients, len(train.sent)) > 0)):
        state.rounds_without_update = 0
        new_arrays, train_metrics = strategy.aggregate_train(server_round, by_client(accepted))
        if new_arrays is not None:
            state.arrays = same_dtypes(new_arrays, state.arrays)
    elif not all_declined:  # too few sound updates: the global model stays as it was
        state.rounds_without_update += 1
    privacy.record_round(rows, accepted)

    seed_sampling(config.run.seed, server_round, "evaluate")
    federated = exchange(run.grid, strategy.configure_evaluate(server_round, state.arrays,
                                                               ConfigRecord(), run.grid),
                         timeout, progress("evaluate"), run.stop)
    sound_evaluations = [r for r in federated.ok
                         if check_evaluate_reply(r, max_test_examples) is None]
    global_eval = evaluate_global(run.resources, state.arrays)
    row = RoundRow(
        round=server_round,
        train_loss=_weighted(accepted, protocol.TRAIN_LOSS),
        eval_loss=global_eval.loss,
        eval_accuracy=global_eval.accuracy,
        eval_macro_f1=global_eval.macro_f1,
        **privacy.columns(),
        clients_sampled=len(train.sent),
        clients_ok=len(accepted),
        clients_failed=len(train.sent) - len(accepted),
        bytes_up=train.bytes_up + federated.bytes_up,
        bytes_down=train.bytes_down + federated.bytes_down,
        wall_s=time.perf_counter() - round_start,
        federated_eval_loss=_weighted(sound_evaluations, protocol.EVAL_LOSS),
        federated_eval_accuracy=_weighted(sound_evaluations, protocol.EVAL_ACCURACY),
    )
    return RoundOutcome(row, rows, global_eval, train_metrics, len(train.sent),
                        len(screened.declined))

