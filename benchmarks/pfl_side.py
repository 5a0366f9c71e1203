"""pfl-research's side of ``benchmarks/engine_benchmarks.py``: the same federation, model and
initial weights as a fedtune config, trained with pfl's simulator (Apple's pfl 0.6.0,
``pip install -e '.[bench]'``).

The data, the partition into clients, the model inputs (hashed features, or token ids padded
to the longest text of each client) and the initial weights are fedtune's own (built from the
config given as ``--set`` overrides), so both simulators start from the same bytes. pfl runs
FedAvg (``FederatedAveraging`` with ``WeightByDatapoints`` and a central SGD step of 1.0),
every client every round, the same local optimizer (AdamW, fused, learning rate, weight decay,
batch size, local steps) and a central evaluation on fedtune's global test set after every round. One torch
thread per process. Run it alone for one process, or under
``python -m torch.distributed.run --nproc_per_node=2`` for two workers (gloo).

Prints one JSON line per round: ``{"round", "wall_s", "cpu_s", "accuracy"}`` (rank 0; cpu_s
summed over the ranks).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import time

import numpy as np
import torch
from torch import nn


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Classifier(nn.Module):
    """fedtune's model with the ``loss`` and ``metrics`` pfl's PyTorchModel calls; pfl hands
    over a batch as positional tensors, the inputs (named ``input_names``) then the labels."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, inputs, strict=True)))
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, *batch: torch.Tensor, eval: bool = False):
        self.eval() if eval else self.train()
        return self.loss_fn(self(*batch[:-1]), batch[-1])

    @torch.no_grad()
    def metrics(self, *batch: torch.Tensor, eval: bool = True):
        from pfl.metrics import Weighted

        self.eval() if eval else self.train()
        logits, labels = self(*batch[:-1]), batch[-1]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct = (logits.argmax(dim=-1) == labels).sum().item()
        return {"loss": Weighted(loss, len(labels)), "accuracy": Weighted(correct, len(labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", default=[], help="fedtune config override")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    from fedtune.config import load_config
    from fedtune.models.build import build_model
    from fedtune.task import task_resources

    config = load_config(None, args.set)
    resources = task_resources(config)
    federation = resources.federation
    labels = federation.data.labels

    def tensors(rows: np.ndarray) -> list[torch.Tensor]:
        """A set of rows as pfl's raw data: the model inputs (token ids padded to the longest
        of the set), then the labels."""
        inputs = resources.encoded.pad(rows)
        return [*inputs.values(), torch.from_numpy(labels[rows])]

    input_names = tuple(resources.encoded.pad(federation.test_rows[:1]))
    users = [tensors(rows) for rows in federation.client_train_rows]
    central = Dataset(raw_data=tensors(federation.test_rows))
    training = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse",
                                                                   range(len(users))))
    network = Classifier(build_model(resources.spec, config.run.seed), input_names)
    # fedtune's weight decay (and momentum), not torch's defaults: AdamW's is 0.01, fedtune's 0
    c = config.client
    optimizer = (functools.partial(torch.optim.AdamW, fused=True, weight_decay=c.weight_decay)
                 if c.optimizer == "adamw" else
                 functools.partial(torch.optim.SGD, momentum=c.momentum,
                                   weight_decay=c.weight_decay))
    model = PyTorchModel(model=network, local_optimizer_create=optimizer,
                         central_optimizer=torch.optim.SGD(network.parameters(), lr=1.0))
    distributed = get_default_framework_module().distributed
    rank = distributed.global_rank

    class TimedEvaluation(CentralEvaluationCallback):
        """fedtune's server evaluation: the global test set after every round (pfl's own
        callback evaluates before training and skips the first round), and the round's time."""

        def on_train_begin(self, *, model):
            self.wall, self.cpu = time.perf_counter(), _cpu_s()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stop, metrics = self._eval(model)
            now, cpu = time.perf_counter(), _cpu_s()
            spent = torch.tensor([cpu - self.cpu], dtype=torch.float64)
            cpu_all = float(distributed.all_reduce([spent])[0].item())
            accuracy = metrics.to_simple_dict().get("Central val | accuracy")
            if rank == 0:
                print(json.dumps({"round": central_iteration + 1, "wall_s": now - self.wall,
                                  "cpu_s": cpu_all, "accuracy": accuracy}), flush=True)
            self.wall, self.cpu = time.perf_counter(), _cpu_s()
            return stop, metrics

    eval_params = NNEvalHyperParams(local_batch_size=config.client.eval_batch_size)
    FederatedAveraging().run(
        # evaluation_frequency is pfl's evaluation of every sampled user's data before and
        # after its training; fedtune's workload has none (only the server's), so pfl skips
        # it too after the first round (iteration 0 always evaluates; round 1 is not timed)
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds,
                                           evaluation_frequency=args.rounds + 1,
                                           train_cohort_size=len(users), val_cohort_size=0),
        backend=SimulatedBackend(training_data=training, val_data=None,
                                 postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=config.client.lr,
                                              local_num_epochs=None,
                                              local_num_steps=config.client.local_steps,
                                              local_batch_size=config.client.batch_size),
        model_eval_params=eval_params,
        callbacks=[TimedEvaluation(central, model_eval_params=eval_params)])


if __name__ == "__main__":
    main()
