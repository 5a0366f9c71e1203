"""Flower ClientApp: a message in, local training or evaluation on this client's shard, a reply out.

The client finds its shard from its node config (``partition-id``, set by every simulation
runtime and by ``flower-supernode --node-config``) and the run config (which rebuilds the same
federation in every process). Model and data stay resident in the process between messages.
What it trains is the strategy's client side (``fedtune.client.algorithms``, from the strategy
table) under the privacy mode (``fedtune.privacy``); the keys of the reply are
``fedtune.protocol``'s.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import protocol
from fedtune.client.algorithms import ClientSide
from fedtune.client.secagg import secagg_stage, secagg_train_mod
from fedtune.config import ConfigError
from fedtune.faults import FaultPlan
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.tables.privacy_modes import privacy_mode
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import (
    TaskResources,
    client_round_seed,
    limit_threads,
    parsed_run_config,
    run_config_resources,
    seed_torch,
)
from fedtune.train import evaluate


def _client_id(context: Context, num_clients: int) -> int:
    """The client's id in results; with a benchmark dataset also its partition."""
    if protocol.PARTITION_ID not in context.node_config:
        raise ConfigError("this SuperNode has no node config 'partition-id': start it with "
                          "--node-config \"partition-id=<0..num_clients-1>\"")
    client_id = int(context.node_config[protocol.PARTITION_ID])
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
    data_path = str(context.node_config.get(protocol.DATA_PATH, ""))
    if config.data.dataset == "files" and not data_path:
        raise ConfigError("data.dataset = 'files' needs each SuperNode's own file: start it "
                          "with --node-config \"partition-id=<i> data-path=<file>\"")
    resources = run_config_resources(context.run_config, data_path)
    client_id = _client_id(context, config.data.num_clients)
    load_shared_state(resources.model, protocol.to_numpy(msg.content[protocol.ARRAYS]))
    server_round = int(msg.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))
    shard = 0 if config.data.dataset == "files" else client_id  # a party's file is its shard
    return resources, client_id, shard, server_round


def client_side(resources: TaskResources, msg: Message, context: Context,
                global_arrays: dict) -> ClientSide:
    """The configured strategy's client side (the plain ``ClientSide`` when it has none)."""
    entry = STRATEGIES[resources.config.strategy.name]
    cls = entry.load_client() if entry.client else ClientSide
    return cls(msg.content, context.state, global_arrays, resources.train_settings)


app = ClientApp()
app.query(protocol.SECAGG_ACTION)(secagg_stage)  # SecAgg+'s key set-up and unmasking


@app.train(mods=[secagg_train_mod])  # SecAgg+ masks the reply when the server asks for it
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's training split, as the strategy's
    client side and the privacy mode say (with local DP a client whose budget allows no step
    replies without arrays, saying why)."""
    resources, client_id, shard, server_round = _setup(msg, context)
    config = resources.config
    seed = client_round_seed(config.run.seed, server_round, client_id)
    seed_torch(seed)
    faults = FaultPlan.from_config(config)
    faults.check_crash(client_id, server_round)
    time.sleep(faults.delay_s(client_id, server_round))
    global_arrays = protocol.to_numpy(msg.content[protocol.ARRAYS])
    algorithm = client_side(resources, msg, context, global_arrays)
    local = privacy_mode(config).train(resources, shard, seed, context.state,
                                       algorithm.objective(resources.model))
    result = local.result
    content = RecordDict()
    if local.status is not None:
        content[protocol.STATUS] = ConfigRecord({protocol.REASON: local.status})
    extra_metrics: dict[str, float] = {}
    if result.num_steps:
        local_arrays = shared_state(resources.model)
        records, extra_metrics = algorithm.reply(local_arrays, result.num_steps)
        sent = faults.corrupt_update(client_id, global_arrays, local_arrays)
        content[protocol.ARRAYS] = protocol.to_array_record(sent)
        for name, record in records.items():
            content[name] = record
    # a client that took no step (its privacy budget is spent) measured no loss
    loss = {protocol.TRAIN_LOSS: result.loss} if result.num_steps else {}
    content[protocol.METRICS] = MetricRecord({
        **loss,
        # FedAvg weights by local dataset size (McMahan et al. 2017), not by examples seen
        protocol.NUM_EXAMPLES: len(resources.federation.client_train_rows[shard]),
        protocol.EXAMPLES_SEEN: result.num_examples,
        protocol.NUM_STEPS: result.num_steps,
        protocol.DURATION_S: result.duration_s,
        protocol.PARTITION_ID: client_id,
        **local.metrics,
        **extra_metrics,
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local test split."""
    resources, client_id, shard, _ = _setup(msg, context)
    result = evaluate(resources.model, resources.client_test_loader(shard), resources.device)
    metrics = MetricRecord({
        protocol.EVAL_LOSS: 0.0 if result.num_examples == 0 else result.loss,
        protocol.EVAL_ACCURACY: 0.0 if result.num_examples == 0 else result.accuracy,
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.PARTITION_ID: client_id,
    })
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)
