"""One federated round, as Flower's strategies shape it: configure -> send -> aggregate.

``play_round`` asks the strategy for the train messages, runs the train phase (a report per
client, screened and bounded by ``fedtune.server.guard``, from either transport:
``fedtune.server.phases``), aggregates the sound updates into a candidate model and evaluates it
on the held-out global test set - the candidate becomes the global model unless too few updates
were sound or the guard refuses it (not finite, an absurd step, a non-finite test loss) -, lets
the privacy mode account for the round and runs federated evaluation on the clients' local test
splits. It returns what happened (``RoundOutcome``); writing rows, checkpoints, progress and
stop rules are the listeners' business (``fedtune.server.listeners``).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
from fedtune.server.attack_metrics import aggregated_updates, attack_columns
from fedtune.server.device_rounds import DeviceRounds
from fedtune.server.grid import CohortSpec
from fedtune.server.guard import absurd_step, model_norm, non_finite_tensors, update_norm
from fedtune.server.identity import Identities
from fedtune.server.phases import (
    TrainPhase,
    UpdateBounds,
    aggregate_train,
    evaluate_phase,
    train_phase,
)
from fedtune.server.rollback import Snapshot
from fedtune.server.screening import reply_limits
from fedtune.server.state import RoundState
from fedtune.tables.privacy_modes import PRIVACY_MODES
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
    identities: Identities = field(kw_only=True)  # who each node is
    # the virtual clock of a synchronous run with devices (None: no devices)
    devices: DeviceRounds | None = field(default=None, kw_only=True)
    # told of each model or checkpoint a listener writes: (what, path)
    save_hooks: list[Callable[[str, Path], None]] = field(default_factory=list, kw_only=True)

    def announce_saved(self, what: str, path: Path) -> None:
        """A listener wrote ``what`` ("best_model", "checkpoint", "model") to ``path``."""
        for hook in self.save_hooks:
            hook(what, path)


@dataclass
class RoundOutcome:
    """What happened in one round."""

    row: RoundRow  # its metrics.csv line
    clients: list[ClientRow]  # one clients.csv line per client sampled for training
    # the new global model on the global test set (None: an asynchronous run's server update
    # between evaluations, strategy.eval_every)
    evaluation: EvalResult | None
    train_metrics: MetricRecord | None  # the strategy's aggregate of the train replies
    sampled: int
    declined: int  # clients that sent no update because their privacy budget is spent
    # clients.csv lines of the evaluations that did not count (rejected, failed, timeout)
    evaluations: list[ClientRow] = field(default_factory=list)


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


def example_weighted(metrics: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` weighted by ``num-examples`` over the metrics that carry it (a client
    that saw no example reports no ``train-loss``: it is left out, not counted as 0); None
    without examples."""
    carrying = [m for m in metrics if key in m]
    weights = [float(m[protocol.NUM_EXAMPLES]) for m in carrying]
    if not carrying or sum(weights) == 0:
        return None
    values = [float(m[key]) for m in carrying]
    return float(np.average(values, weights=weights))


def summing(run: FederatedRun) -> bool:
    """Whether the run's strategy gets the summing aggregator (``fedtune.server.summing``): its
    table entry opts in (its aggregate depends only on the example-weighted mean of the
    updates), no privacy mode replaced it and SecAgg+ does not sum it."""
    config = run.config
    return (STRATEGIES[config.strategy.name].weighted_mean
            and not PRIVACY_MODES[config.privacy.mode].replaces_strategy
            and not config.strategy.secure_aggregation)


def aggregate_checked(strategy: Strategy, server_round: int, train: TrainPhase,
                      previous: ArrayRecord, summed: bool = False
                      ) -> tuple[ArrayRecord, MetricRecord | None, str]:
    """The strategy's aggregate of the round's accepted updates (``summed``: through the
    summing aggregator) in ``previous``'s dtypes, its train metrics, and why the aggregate
    cannot become the global model ("" = it can): the strategy failed or returned nothing, the
    aggregate is not finite, or its step is absurd next to the clients' updates
    (``fedtune.server.guard``)."""
    try:
        new_arrays, metrics = aggregate_train(strategy, server_round, train, summed)
    except Exception as error:  # noqa: BLE001 - client input fails the round, not the run
        return previous, None, f"the strategy's aggregation failed ({type(error).__name__}: " \
                               f"{str(error)[:200]})"
    if new_arrays is None:
        return previous, metrics, "the strategy returned no model"
    new_arrays = same_dtypes(new_arrays, previous)
    bad = non_finite_tensors(new_arrays)
    if bad:
        return previous, metrics, f"the aggregate is not finite (in {', '.join(bad[:3])})"
    old = protocol.to_numpy(previous)
    norms = [r.update_norm for r in train.accepted_reports if r.update_norm is not None]
    problem = absurd_step(update_norm(old, protocol.to_numpy(new_arrays)), norms,
                          model_norm(old))
    if problem:
        return previous, metrics, problem
    return new_arrays, metrics, ""


def update_global_model(run: FederatedRun, server_round: int, train: TrainPhase
                        ) -> tuple[MetricRecord | None, str, EvalResult]:
    """Aggregate the sound updates into the new global model, or keep the old one: every
    client declined, too few sound updates, or an aggregate the guard refuses - not finite,
    absurd, or with a loss on the global test set that is not finite (the strategy's state is
    then put back as it was before it aggregated; a round without an update counts towards
    ``run.max_rounds_without_update``). Returns the strategy's train metrics, metrics.csv's
    ``model_update`` and the global model's evaluation on the global test set."""
    config, state, accepted = run.config, run.state, len(train.accepted)
    sent = len(train.sent)

    def tested(arrays: ArrayRecord) -> EvalResult:
        run.progress(server_round, "test", 0, 0)  # the server's evaluation on its test set
        return evaluate_global(run.resources, arrays)

    if sent and train.declined == sent:
        return None, "kept: every sampled client has spent its privacy budget", \
            tested(state.arrays)
    # DP-FedAvg releases a noised update every round, even from an empty Poisson cohort
    if not run.privacy.releases_empty_rounds and not (
            accepted >= min(config.strategy.min_train_clients, sent) > 0):
        state.rounds_without_update += 1
        return None, f"kept: {accepted} sound updates of {sent}", tested(state.arrays)
    before = Snapshot.of(run.strategy)
    new_arrays, train_metrics, problem = aggregate_checked(
        run.strategy, server_round, train, state.arrays, summing(run))
    if not problem:
        evaluation = tested(new_arrays)
        if math.isfinite(evaluation.loss):
            state.rounds_without_update = 0
            state.arrays = new_arrays
            return train_metrics, "applied", evaluation
        problem = f"the new model's loss on the global test set is {evaluation.loss}"
    before.restore()
    state.rounds_without_update += 1
    return train_metrics, f"kept: {problem}", tested(state.arrays)


def play_round(run: FederatedRun, server_round: int) -> RoundOutcome:
    """Train, aggregate, account and evaluate one round; updates ``run.state`` in place."""
    config, state, strategy, privacy = run.config, run.state, run.strategy, run.privacy
    identities = run.identities
    round_start = time.perf_counter()
    timeout = config.strategy.round_timeout_s
    limits = reply_limits(config, run.resources.federation, lambda: run.resources.model)

    def progress(phase: str) -> Callable[[int, int], None]:
        return lambda done, total: run.progress(server_round, phase, done, total)

    seed_sampling(config.run.seed, server_round, "train")
    sampling_grid, plan = run.grid, None
    if run.devices is not None:  # the available clients, on the virtual clock
        sampling_grid, start = run.devices.sampling_grid(run.grid, state.virtual_time_s)
    messages = list(strategy.configure_train(server_round, state.arrays, ConfigRecord(),
                                             sampling_grid))
    if run.devices is not None:  # the first K to finish train; the stragglers are dropped
        plan = run.devices.plan(messages, start)
        messages = plan.kept
    run.progress(server_round, "train", 0, len(messages))  # each phase names itself as it starts
    bounds = UpdateBounds(state.arrays, config.strategy.max_update_norm,
                          config.strategy.update_norm_z)
    # the guard needs each update: a bounded cohort is not summed where it ran
    spec = CohortSpec(weighted_mean=summing(run) and not bounds.active, limits=limits)
    train = train_phase(run.grid, messages, spec, server_round, identities, bounds, timeout,
                        progress("train"), run.stop)
    run.progress(server_round, "aggregate", 0, 0)
    rows = train.rows(server_round)
    aggregated = aggregated_updates(run.resources, train)  # an attacked run's, for its rates
    train_metrics, model_update, global_eval = update_global_model(run, server_round, train)
    privacy.record_round(rows, train.accepted, train_metrics)
    attack = attack_columns(run.resources, strategy, server_round, train, aggregated,
                            state.arrays)

    seed_sampling(config.run.seed, server_round, "evaluate")
    to_evaluate = list(strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(),
                                                   run.grid))
    run.progress(server_round, "evaluate", 0, len(to_evaluate))
    evaluation = evaluate_phase(run.grid, to_evaluate, limits, server_round, identities, timeout,
                                progress("evaluate"), run.stop)
    row = RoundRow(
        round=server_round,
        train_loss=example_weighted(train.accepted, protocol.TRAIN_LOSS),
        eval_loss=global_eval.loss,
        eval_accuracy=global_eval.accuracy,
        eval_macro_f1=global_eval.macro_f1,
        **privacy.columns(),
        clients_sampled=len(train.sent),
        clients_ok=len(train.accepted),
        clients_failed=len(train.sent) - len(train.accepted),
        bytes_up=train.bytes_up + evaluation.bytes_up,
        bytes_down=train.bytes_down + evaluation.bytes_down,
        wall_s=time.perf_counter() - round_start,
        federated_eval_loss=example_weighted(evaluation.metrics, protocol.EVAL_LOSS),
        federated_eval_accuracy=example_weighted(evaluation.metrics, protocol.EVAL_ACCURACY),
        model_update=model_update,
        replies_dropped=train.dropped + evaluation.dropped,
        **attack,
    )
    if plan is not None:
        rows = run.devices.settle(plan, server_round, rows, row)
        state.virtual_time_s = plan.end
    return RoundOutcome(row, rows, global_eval, train_metrics, row.clients_sampled,
                        train.declined, evaluation.rows(server_round))
