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
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.config import Config
from fedtune.models.weights import load_shared_state
from fedtune.privacy.mode import PrivacyServer
from fedtune.results.run_dir import ClientRow, RoundRow
from fedtune.server.grid import CohortSpec
from fedtune.server.phases import evaluate_phase, train_phase
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


def _weighted(metrics: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` weighted by ``num-examples`` (None without examples)."""
    weights = [float(m[protocol.NUM_EXAMPLES]) for m in metrics]
    if not metrics or sum(weights) == 0:
        return None
    values = [float(m[key]) for m in metrics]
    return float(np.average(values, weights=weights))


def weighted_mean_aggregate(run: FederatedRun) -> bool:
    """Whether the run's strategy aggregates only the example-weighted mean of the updates
    (its table entry says so, and no privacy mode replaced it), so the cohort may be summed
    where the clients train."""
    entry = STRATEGIES[run.config.strategy.name]
    return entry.weighted_mean and type(run.strategy) is entry.load()


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
    messages = list(strategy.configure_train(server_round, state.arrays, ConfigRecord(),
                                             run.grid))
    spec = CohortSpec(weighted_mean=weighted_mean_aggregate(run),
                      answers=STRATEGIES[config.strategy.name].answers,
                      max_examples=max_train_examples, accept_declines=privacy.accepts_declines)
    train = train_phase(run.grid, messages, spec, server_round, state.node_to_client, timeout,
                        progress("train"), run.stop)
    train_metrics: MetricRecord | None = None
    all_declined = bool(train.sent) and train.declined == train.sent
    # DP-FedAvg releases a noised update every round, even from an empty Poisson cohort
    if not all_declined and (privacy.releases_empty_rounds or (
            len(train.accepted) >= min(config.strategy.min_train_clients, train.sent) > 0)):
        state.rounds_without_update = 0
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train.replies)
        if new_arrays is not None:
            state.arrays = same_dtypes(new_arrays, state.arrays)
    elif not all_declined:  # too few sound updates: the global model stays as it was
        state.rounds_without_update += 1
    privacy.record_round(train.rows, train.accepted, train_metrics)

    seed_sampling(config.run.seed, server_round, "evaluate")
    evaluation = evaluate_phase(
        run.grid, list(strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(),
                                                   run.grid)),
        max_test_examples, timeout, progress("evaluate"), run.stop)
    global_eval = evaluate_global(run.resources, state.arrays)
    row = RoundRow(
        round=server_round,
        train_loss=_weighted(train.accepted, protocol.TRAIN_LOSS),
        eval_loss=global_eval.loss,
        eval_accuracy=global_eval.accuracy,
        eval_macro_f1=global_eval.macro_f1,
        **privacy.columns(),
        clients_sampled=train.sent,
        clients_ok=len(train.accepted),
        clients_failed=train.sent - len(train.accepted),
        bytes_up=train.bytes_up + evaluation.bytes_up,
        bytes_down=train.bytes_down + evaluation.bytes_down,
        wall_s=time.perf_counter() - round_start,
        federated_eval_loss=_weighted(evaluation.metrics, protocol.EVAL_LOSS),
        federated_eval_accuracy=_weighted(evaluation.metrics, protocol.EVAL_ACCURACY),
    )
    return RoundOutcome(row, train.rows, global_eval, train_metrics, train.sent,
                        train.declined)

