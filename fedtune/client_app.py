"""Flower ClientApp: a message in, local training or evaluation on this client's shard, a reply out.

The client finds its shard from its node config (``partition-id``, set by every simulation
runtime and by ``flower-supernode --node-config``) and the run config (which rebuilds the same
federation in every process). Model and data stay resident in the process between messages.
"""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client_algorithms import ClientAlgorithm
from fedtune.config import ConfigError
from fedtune.faults import FaultPlan
from fedtune.models.build import load_shared_state, shared_state
from fedtune.privacy.accounting import history_from_lists, history_to_lists
from fedtune.privacy.local_dp import (
    PrivateTrainResult,
    local_dp_settings,
    poisson_loader,
    train_private,
)
from fedtune.task import (
    TaskResources,
    client_round_seed,
    limit_threads,
    parsed_run_config,
    run_config_resources,
    seed_torch,
    train_settings,
)
from fedtune.train import evaluate, train_local

PARTITION_KEY = "partition-id"
DATA_PATH_KEY = "data-path"
ROUND_KEY = "server-round"
ACCOUNTANT_KEY = "dp-accountant"  # in Context.state: this client's DP-SGD history
STATUS_KEY = "status"  # in a train reply: why training stopped early ("" = it did not)


def _client_id(context: Context, num_clients: int) -> int:
    """The client's id in results; with a benchmark dataset also its partition."""
    if PARTITION_KEY not in context.node_config:
        raise ConfigError("this SuperNode has no node config 'partition-id': start it with "
                          "--node-config \"partition-id=<0..num_clients-1>\"")
    client_id = int(context.node_config[PARTITION_KEY])
    if not 0 <= client_id < num_clients:
        raise ConfigError(
            f"partition-id = {client_id} is not allowed: must be in "
            f"0..{num_clients - 1} (data.num_clients)"
        )
    return client_id


def _setup(msg: Message, context: Context) -> tuple[TaskResources, int, int, int]:
    """Resources, client id, the client's shard in the federation, server round."""
    config = parsed_run_config(context.run_config)
    if config.engine.backend != "inprocess":
        limit_threads(config.engine.client_cpus)
    data_path = str(context.node_config.get(DATA_PATH_KEY, ""))
    if config.data.dataset == "files" and not data_path:
        raise ConfigError("data.dataset = 'files' needs each SuperNode's own file: start it "
                          "with --node-config \"partition-id=<i> data-path=<file>\"")
    resources = run_config_resources(context.run_config, data_path)
    client_id = _client_id(context, config.data.num_clients)
    arrays = msg.content["arrays"]
    load_shared_state(resources.model, {name: array.numpy() for name, array in arrays.items()})
    server_round = int(msg.content["config"].get(ROUND_KEY, 0))
    shard = 0 if config.data.dataset == "files" else client_id  # a party's file is its shard
    return resources, client_id, shard, server_round


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


app = ClientApp()


def train_with_local_dp(resources: TaskResources, shard: int, seed: int,
                        context: Context) -> PrivateTrainResult:
    """DP-SGD whose accountant history lives in this client's Context.state across rounds."""
    config = resources.config
    loader = poisson_loader(resources.encoded, resources.federation.data.labels,
                            resources.federation.client_train_rows[shard],
                            config.client.batch_size, seed, resources.model)
    history = (history_from_lists(context.state[ACCOUNTANT_KEY])
               if ACCOUNTANT_KEY in context.state else [])
    result = train_private(resources.model, loader, train_settings(config),
                           local_dp_settings(config), history, resources.device)
    context.state[ACCOUNTANT_KEY] = ConfigRecord(history_to_lists(result.history))
    return result


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's training split (with local DP:
    DP-SGD; a client whose budget allows no step replies without arrays, saying why)."""
    resources, client_id, shard, server_round = _setup(msg, context)
    seed = client_round_seed(resources.config.run.seed, server_round, client_id)
    seed_torch(seed)
    faults = FaultPlan.from_config(resources.config)
    faults.check_crash(client_id, server_round)
    time.sleep(faults.delay_s(client_id, server_round))
    content = RecordDict()
    settings = train_settings(resources.config)
    global_arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    algorithm = ClientAlgorithm(msg.content, context.state, global_arrays, settings)
    if resources.config.privacy.mode == "local":
        private = train_with_local_dp(resources, shard, seed, context)
        result = private.train
        content[STATUS_KEY] = ConfigRecord({"reason": private.stopped})
        privacy_metrics = {"noise-multiplier": private.noise_multiplier,
                           "sample-rate": private.sample_rate}
        if math.isfinite(private.epsilon):  # replies carry finite numbers; no noise = no ε
            privacy_metrics["epsilon"] = private.epsilon
    else:
        result = train_local(resources.model, resources.client_train_loader(shard, seed),
                             settings, resources.device, algorithm.objective(resources.model))
        privacy_metrics = {}
    extra_metrics: dict[str, float] = {}
    if result.num_steps:
        local_arrays = shared_state(resources.model)
        records, extra_metrics = algorithm.reply(local_arrays, result.num_steps)
        sent = faults.corrupt_update(client_id, global_arrays, local_arrays)
        content["arrays"] = to_array_record(sent)
        for name, record in records.items():
            content[name] = record
    # a client that took no step (its privacy budget is spent) measured no loss
    loss = {"train_loss": result.loss} if result.num_steps else {}
    content["metrics"] = MetricRecord({
        **loss,
        # FedAvg weights by local dataset size (McMahan et al. 2017), not by examples seen
        "num-examples": len(resources.federation.client_train_rows[shard]),
        "examples-seen": result.num_examples,
        "num-steps": result.num_steps,
        "duration-s": result.duration_s,
        PARTITION_KEY: client_id,
        **privacy_metrics,
        **extra_metrics,
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local test split."""
    resources, client_id, shard, _ = _setup(msg, context)
    result = evaluate(resources.model, resources.client_test_loader(shard), resources.device)
    metrics = MetricRecord({
        "eval_loss": 0.0 if result.num_examples == 0 else result.loss,
        "eval_accuracy": 0.0 if result.num_examples == 0 else result.accuracy,
        "num-examples": result.num_examples,
        PARTITION_KEY: client_id,
    })
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
