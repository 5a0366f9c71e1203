"""Flower ClientApp: a message in, local training or evaluation on this client's shard, a reply out.

The client finds its shard from its node config (``partition-id``, set by every simulation
runtime and by ``flower-supernode --node-config``) and the run config (which rebuilds the same
federation in every process). Model and data stay resident in the process between messages.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config import ConfigError
from fedtune.models.build import load_shared_state, shared_state
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's training split."""
    resources, client_id, shard, server_round = _setup(msg, context)
    seed = client_round_seed(resources.config.run.seed, server_round, client_id)
    seed_torch(seed)
    result = train_local(resources.model, resources.client_train_loader(shard, seed),
                         train_settings(resources.config), resources.device)
    metrics = MetricRecord({
        "train_loss": result.loss,
        # FedAvg weights by local dataset size (McMahan et al. 2017), not by examples seen
        "num-examples": len(resources.federation.client_train_rows[shard]),
        "examples-seen": result.num_examples,
        "num-steps": result.num_steps,
        "duration-s": result.duration_s,
        PARTITION_KEY: client_id,
    })
    content = RecordDict({"arrays": to_array_record(shared_state(resources.model)),
                          "metrics": metrics})
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
