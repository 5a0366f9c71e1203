"""The centralized reference: what pooling the clients' data would give.

A federated result means little without the number a user would get by pooling the data. A
centralized run trains the same model (the same spec and initial weights, ``run.seed``), on the
same encoded inputs through the same loaders (``client.batch_size``), with the same optimizer
(``client.*``), on the union of the clients' training splits, and evaluates on the same global
test set. ``engine.central_until`` is its budget:

- ``"examples"``: as many training examples as the federated run's clients train on, in
  expectation: each round ``clients_per_round`` clients, each what one client of the
  federation trains on in a round on average (``local_steps`` batches of ``batch_size``, an
  epoch's last batch partial, or ``local_epochs`` passes over its split). One metrics.csv row
  per such "round", so centralized and federated curves share their x axis. The optimizer
  keeps its state from round to round (it is one training run).
- ``"converged"``: epochs over the pooled data until the loss on the clients' pooled local test
  splits (data the federated run never trains on; the global test set is not looked at)
  has not improved for ``engine.central_patience`` epochs, or ``engine.central_max_epochs``.
  One row per epoch; the model kept - and summary.json's ``final`` - is the epoch with the
  lowest validation loss (early stopping, Prechelt 1998 "Early stopping - but when?").

``run.reference = true`` asks a federated run for its reference (``ensure_reference``): the
``"examples"`` run of ``fedtune.config.centralized_config``, in ``run.reference_dir`` (a
finished one with the same config is reused, so a sweep trains it once per data set-up).
"""

from __future__ import annotations

import copy
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtune.config import Config, centralized_config
from fedtune.data.encode import Batch
from fedtune.data.loaders import eval_loader, train_loader
from fedtune.models.build import build_model, save_model
from fedtune.results.plots import plot_accuracy_loss, plot_partitions
from fedtune.results.run_dir import RoundRow, RunDirectory, is_finished
from fedtune.results.summary import build_summary
from fedtune.tables.strategies import clients_per_round
from fedtune.task import TaskResources, seed_torch, task_resources
from fedtune.train import EvalResult, TrainResult, evaluate, make_optimizer, train_local

if TYPE_CHECKING:  # the server's reporter interface (the server wing sits above this module)
    from fedtune.server.reporting import Reporter

CENTRAL_STREAM = 7  # seeds the pooled batch order apart from the data stages (0-3)
REFERENCE_FOLDER = "centralized"  # <run dir>/centralized unless run.reference_dir says


def client_examples_per_round(size: int, batch_size: int, local_steps: int,
                              local_epochs: int) -> int:
    """Examples one client with ``size`` training examples trains on in a round: the loader
    caps the batch at the client's size and an epoch's last batch is partial."""
    if size == 0:
        return 0
    if local_steps == 0:
        return local_epochs * size
    batch = min(batch_size, size)
    full_epochs, rest = divmod(local_steps, math.ceil(size / batch))
    return full_epochs * size + rest * batch  # rest batches: all full (the partial is last)


def examples_per_round(config: Config, client_sizes: list[int]) -> float:
    """What a federated round trains on in expectation: the clients sampled per round times
    the mean over the federation's clients of what one of them trains on."""
    c = config.client
    per_client = [client_examples_per_round(n, c.batch_size, c.local_steps, c.local_epochs)
                  for n in client_sizes]
    return clients_per_round(config) * float(np.mean(per_client))


class PooledBatches:
    """Batches over the pooled rows, epoch after epoch (each epoch's order seeded by
    ``run.seed`` and the epoch), taken ``take(n)`` examples at a time: the stream resumes where
    the previous take stopped, as one long training run."""

    def __init__(self, resources: TaskResources, rows: np.ndarray) -> None:
        self.resources, self.rows = resources, rows
        self.epochs_started = 0
        self._stream = self._epochs()

    def _epochs(self) -> Iterator[Batch]:
        config = self.resources.config
        while True:
            seed = int(np.random.SeedSequence([config.run.seed, CENTRAL_STREAM,
                                               self.epochs_started]).generate_state(1)[0])
            self.epochs_started += 1
            yield from train_loader(self.resources.encoded, self.resources.federation.data.labels,
                                    self.rows, config.client.batch_size, seed)

    def take(self, examples: int) -> Iterator[Batch]:
        """Batches until at least ``examples`` examples were yielded (at least one batch)."""
        seen = 0
        while True:
            batch = next(self._stream)
            yield batch
            seen += len(batch[1])
            if seen >= examples:
                return


@dataclass
class CentralOutcome:
    """How a centralized run went."""

    examples_seen: int = 0
    best_round: int | None = None  # converged: the epoch whose model was kept
    stop_reason: str = ""
    stopped: bool = False  # ``stop`` was set: the run ended early and is not finished


def _eval(resources: TaskResources, model: torch.nn.Module, rows: np.ndarray) -> EvalResult:
    loader = eval_loader(resources.encoded, resources.federation.data.labels, rows,
                         resources.config.client.eval_batch_size)
    return evaluate(model, loader, resources.device)


def _row(server_round: int, trained: TrainResult, test: EvalResult,
         validation: EvalResult | None, wall_s: float) -> RoundRow:
    return RoundRow(
        round=server_round, train_loss=trained.loss, eval_loss=test.loss,
        eval_accuracy=test.accuracy, eval_macro_f1=test.macro_f1, epsilon=None,
        max_client_epsilon=None, clip_norm=None, clipped_fraction=None, noise_std=None,
        clients_sampled=0, clients_ok=0, clients_failed=0,
        bytes_up=0, bytes_down=0, wall_s=wall_s,
        federated_eval_loss=None if validation is None else validation.loss,
        federated_eval_accuracy=None if validation is None else validation.accuracy)


def train_centralized(config: Config, reporter: Reporter | None = None,
                      stop: threading.Event | None = None) -> tuple[RunDirectory, CentralOutcome]:
    """Train ``config``'s centralized run (``engine.backend = "central"``) into ``run.dir``;
    see the module doc. Setting ``stop`` ends it after the current round or epoch, with the
    finished rows on disk and no summary.json."""
    started = time.perf_counter()
    resources = task_resources(config)
    federation = resources.federation
    run_dir = RunDirectory.create(config, config.run.dir or None)
    histogram = federation.label_histogram()
    run_dir.write_partitions(histogram, federation.data.label_names)
    plot_partitions(histogram, federation.data.label_names, run_dir.plots_dir / "partitions.png")
    seed_torch(config.run.seed)
    model = build_model(resources.spec, config.run.seed).to(resources.device)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               resources.train_settings)
    pooled = np.sort(np.concatenate(federation.client_train_rows))
    validation_rows = np.sort(np.concatenate(federation.client_test_rows))
    stream = PooledBatches(resources, pooled)
    converging = config.engine.central_until == "converged"
    per_round = examples_per_round(config, [len(r) for r in federation.client_train_rows])
    rounds = config.engine.central_max_epochs if converging else config.run.rounds
    # one pass of the stream's take(): every batch it yields, once
    settings = replace(resources.train_settings, local_steps=0, local_epochs=1)
    outcome = CentralOutcome()
    best_loss, best_state, final_eval, waited = math.inf, None, None, 0
    if reporter is not None:
        reporter.start(replace(config, run=replace(config.run, rounds=rounds)), run_dir)
    for server_round in range(1, rounds + 1):
        if stop is not None and stop.is_set():
            outcome.stopped, outcome.stop_reason = True, "stopped"
            break
        round_start = time.perf_counter()
        if reporter is not None:
            reporter.phase(server_round, "train", 0, 0)  # the pooled data: no clients
        # the examples target is cumulative, so a batch that overshoots one round's share is
        # taken off the next one
        target = len(pooled) if converging else round(server_round * per_round)
        want = target if converging else target - outcome.examples_seen
        trained = train_local(model, stream.take(max(1, want)), settings, resources.device,
                              optimizer=optimizer)
        outcome.examples_seen += trained.num_examples
        test = evaluate(model, resources.global_test_loader(), resources.device)
        validation = _eval(resources, model, validation_rows) if converging else None
        row = _row(server_round, trained, test, validation, time.perf_counter() - round_start)
        run_dir.append_round(row, [])
        if reporter is not None:
            reporter.round_end(row)
        final_eval = test
        if not converging:
            continue
        if validation.loss < best_loss:
            best_loss, waited = validation.loss, 0
            best_state = copy.deepcopy(model.state_dict())
            outcome.best_round, final_eval = server_round, test
        else:
            waited += 1
        if waited >= config.engine.central_patience:
            outcome.stop_reason = (
                f"converged: the validation loss did not improve for {waited} epochs after "
                f"epoch {outcome.best_round} (engine.central_patience)")
            break
    else:
        if converging:
            outcome.stop_reason = (f"engine.central_max_epochs = {rounds} reached before the "
                                   "validation loss stopped improving")
    if outcome.stopped or final_eval is None:
        return run_dir, outcome
    if best_state is not None:
        model.load_state_dict(best_state)
        final_eval = evaluate(model, resources.global_test_loader(), resources.device)
    _finish(config, resources, run_dir, model, final_eval, outcome, per_round, len(pooled),
            len(validation_rows), time.perf_counter() - started)
    if reporter is not None:
        reporter.finish(run_dir.read_json("summary.json"), run_dir)
    return run_dir, outcome


def _finish(config: Config, resources: TaskResources, run_dir: RunDirectory,
            model: torch.nn.Module, final_eval: EvalResult, outcome: CentralOutcome,
            per_round: float, pooled: int, validation: int, total_s: float) -> None:
    """The model, the accuracy/loss plot and summary.json of a centralized run."""
    save_model(model, resources.spec, run_dir.model_dir)
    plot_accuracy_loss(run_dir.metrics(), run_dir.plots_dir / "accuracy_loss.png")
    section = {
        "until": config.engine.central_until,
        "pooled_train_examples": pooled,
        "validation_examples": validation if config.engine.central_until == "converged" else 0,
        "federated_examples_per_round": per_round,
        "examples_seen": outcome.examples_seen,
        "epochs": outcome.examples_seen / pooled if pooled else 0.0,
        "best_epoch": outcome.best_round,
    }
    summary = build_summary(
        config, resources, run_dir, final_eval, total_s, outcome.stop_reason,
        final_round=outcome.best_round, strategy={"name": "centralized"},
        privacy={"mode": "none"}, runtime={"backend": "central", "reproducible": True},
        centralized=section)
    run_dir.write_json("summary.json", summary)


def reference_path(config: Config) -> Path:
    """Where ``config``'s centralized reference lives."""
    return Path(config.run.reference_dir or Path(config.run.dir) / REFERENCE_FOLDER)


def ensure_reference(config: Config) -> dict[str, Any]:
    """The summary.json of ``config``'s centralized reference: a finished one with the same
    config is reused, anything else in its directory is replaced by a new run."""
    path = reference_path(config)
    reference = centralized_config(config, "examples", str(path))
    if not is_finished(path, reference):
        if path.exists():
            shutil.rmtree(path)
        run_dir, outcome = train_centralized(reference)
        if outcome.stopped:
            raise RuntimeError(f"the centralized reference in {path} was stopped")
    return RunDirectory(path).read_json("summary.json")


def reference_section(reference: dict[str, Any], accuracy: float | None) -> dict[str, Any]:
    """What a federated run's summary.json says of its reference: ``centralized_accuracy``,
    ``gap_to_centralized`` (reference minus this run's final accuracy: how far short of
    pooling the data it falls) and where the reference is."""
    central = reference["final"]["eval_accuracy"]
    gap = None if accuracy is None or central is None else central - accuracy
    return {
        "centralized_accuracy": central,
        "gap_to_centralized": gap,
        "centralized": {
            "run_dir": reference["run_dir"],
            "eval_accuracy": central,
            "eval_macro_f1": reference["final"]["eval_macro_f1"],
            "examples_seen": reference["centralized"]["examples_seen"],
            "epochs": reference["centralized"]["epochs"],
        },
    }
