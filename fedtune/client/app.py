"""Flower ClientApp: a message in, local training or evaluation on this client's shard, a reply out.

The work itself is two plain functions, ``train_client`` and ``evaluate_client``: the ClientApp
unpacks a Flower message, calls them and packs the reply; fedtune's engines call them directly
for a whole cohort of clients (``fedtune.engine.cohort``), so every runtime trains with the same
code. What a client trains is the strategy's client side (``fedtune.client.algorithms``, from
the strategy table) under the privacy mode (``fedtune.privacy``), with the ``[faults]`` plan
and the ``[attack]`` (``fedtune.client.attacking``) applied; the keys of the reply are
``fedtune.protocol``'s.

The client finds its shard from its node config (``partition-id``, set by every simulation
runtime and by ``flower-supernode --node-config``) and the run config (which rebuilds the same
federation in every process). Model and data stay resident in the process between messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import protocol
from fedtune.client.algorithms import ClientSide
from fedtune.client.attacking import attacked_update, training_data
from fedtune.client.node_state import node_state_mod
from fedtune.client.personal import personal_metrics
from fedtune.client.secagg_stages import secagg_stage, secagg_train_mod
from fedtune.config import Config, ConfigError
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.tables.datasets import DATASETS
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import (
    TaskResources,
    client_round_seed,
    limit_threads,
    parsed_run_config,
    run_config_resources,
    seed_torch,
)
from fedtune.train import TrainResult, evaluate


@dataclass
class TrainedClient:
    """One client's training in one round, unpacked (what its reply message carries)."""

    # the model it sends back (None: it took no step); on CPU, views of the resident model's
    # tensors, valid until the next client loads its weights
    arrays: dict[str, np.ndarray] | None
    records: dict[str, ArrayRecord] = field(default_factory=dict)  # its strategy's extra ones
    metrics: dict[str, float | int] = field(default_factory=dict)
    status: str | None = None  # its privacy mode's STATUS reason (None: no such record)


def client_shard(config: Config, client_id: int) -> int:
    """The training split a client's process holds for it: its partition, or with private
    per-party files (a dataset of ``party_files``) the one shard its own file makes."""
    return 0 if DATASETS[config.data.dataset].party_files else client_id


def train_client(resources: TaskResources, client_id: int, server_round: int,
                 content: RecordDict, global_arrays: dict[str, np.ndarray],
                 state: RecordDict) -> TrainedClient:
    """Train the global model on client ``client_id``'s training split, as the strategy's
    client side and the privacy mode say (``content``: the train message's records,
    ``global_arrays``: its model, decoded; ``state``: the client's Context.state). With local
    DP, a client whose budget allows no step trains nothing and says why."""
    config = resources.config
    model = resources.model  # built (and seeded) on first use: before this client's seed
    shard = client_shard(config, client_id)
    seed = client_round_seed(config.run.seed, server_round, client_id,
                             protocol.message_dispatch(content))
    seed_torch(seed)
    faults = resources.faults
    faults.check_crash(client_id, server_round)
    delay = faults.delay_s(client_id, server_round)
    if delay:
        time.sleep(delay)
    load_shared_state(model, global_arrays)
    entry = STRATEGIES[config.strategy.name]
    side_class = entry.load_client() if entry.client else ClientSide
    algorithm = side_class(content, state, global_arrays, resources.train_settings)
    with training_data(resources, client_id, shard, server_round):
        local = algorithm.train(resources, shard, seed) or resources.privacy.train(
            resources, shard, seed, state, algorithm.objective(model))
    result = local.result
    trained = TrainedClient(arrays=None, status=local.status)
    extra_metrics: dict[str, float] = {}
    if result.num_steps:
        local_arrays = shared_state(model, copy=False)  # the reply or the cohort copies them
        trained.records, extra_metrics = algorithm.reply(local_arrays, result.num_steps)
        if resources.attack.attacks(client_id, server_round):
            local_arrays = attacked_update(resources, client_id, server_round, content,
                                           global_arrays, local_arrays)
        trained.arrays = faults.corrupt_update(client_id, local_arrays)
    trained.metrics = train_metrics(resources, shard, client_id, result, local.metrics,
                                    extra_metrics)
    return trained


def train_metrics(resources: TaskResources, shard: int, client_id: int, result: TrainResult,
                  privacy_metrics: dict[str, float], extra_metrics: dict[str, float]
                  ) -> dict[str, float | int]:
    """The metrics of a training reply: the training result, the privacy mode's and the
    strategy's client side's own."""
    # a client that saw no example measured no loss: its privacy budget allowed no step, or
    # every Poisson sample of its DP-SGD steps was empty (it stepped on noise alone)
    loss = {protocol.TRAIN_LOSS: result.loss} if result.num_examples else {}
    return {
        **loss,
        # FedAvg weights by local dataset size (McMahan et al. 2017), not by examples seen
        protocol.NUM_EXAMPLES: len(resources.federation.client_train_rows[shard]),
        protocol.EXAMPLES_SEEN: result.num_examples,
        protocol.NUM_STEPS: result.num_steps,
        protocol.DURATION_S: result.duration_s,
        protocol.PARTITION_ID: client_id,
        **privacy_metrics,
        **extra_metrics,
    }


def evaluate_client(resources: TaskResources, client_id: int,
                    global_arrays: dict[str, np.ndarray]) -> dict[str, float | int]:
    """Evaluate the global model on client ``client_id``'s local test split."""
    shard = client_shard(resources.config, client_id)
    load_shared_state(resources.model, global_arrays)
    result = evaluate(resources.model, resources.client_test_loader(shard), resources.device)
    return {
        protocol.EVAL_LOSS: 0.0 if result.num_examples == 0 else result.loss,
        protocol.EVAL_ACCURACY: 0.0 if result.num_examples == 0 else result.accuracy,
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.PARTITION_ID: client_id,
    }


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


def check_insecure_noise(config: Config, context: Context) -> None:
    """A client draws its own DP noise under local DP and under distributed DP (SecAgg+), to
    protect it from the server; so it takes the server's word for
    ``privacy.insecure_reproducible_noise`` (noise anyone with run.seed can rebuild) only when
    its own node config allows it (fedtune's simulated runtimes do, a deployed SuperNode only
    if its operator starts it so)."""
    p = config.privacy
    entry = PRIVACY_MODES[p.mode]
    own_noise = entry.client_noise or (entry.secure_aggregation_client_noise
                                       and config.strategy.secure_aggregation)
    if (own_noise and p.insecure_reproducible_noise
            and context.node_config.get(protocol.INSECURE_NOISE_ALLOWED) is not True):
        raise ConfigError(
            "privacy.insecure_reproducible_noise = true is not allowed by this SuperNode: it "
            "would draw its DP noise from run.seed, which the server knows; start it with "
            f"--node-config \"{protocol.INSECURE_NOISE_ALLOWED}=true\" only for a simulation")


def _setup(msg: Message, context: Context) -> tuple[TaskResources, int, int]:
    """Resources, client id, server round of a message."""
    config = parsed_run_config(context.run_config)
    if not RUNTIMES[config.engine.backend].in_process:
        limit_threads(config.engine.client_cpus)
    data_path = str(context.node_config.get(protocol.DATA_PATH, ""))
    if DATASETS[config.data.dataset].party_files and not data_path:
        raise ConfigError(f"data.dataset = {config.data.dataset!r} needs each SuperNode's own "
                          "file: start it with --node-config \"partition-id=<i> "
                          "data-path=<file>\"")
    check_insecure_noise(config, context)
    resources = run_config_resources(context.run_config, data_path)
    client_id = _client_id(context, config.data.num_clients)
    server_round = int(msg.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))
    return resources, client_id, server_round


def reply_content(trained: TrainedClient) -> RecordDict:
    """The records of a train reply."""
    content = RecordDict()
    if trained.status is not None:
        content[protocol.STATUS] = ConfigRecord({protocol.REASON: trained.status})
    if trained.arrays is not None:
        content[protocol.ARRAYS] = protocol.to_array_record(trained.arrays)
        for name, record in trained.records.items():
            content[name] = record
    content[protocol.METRICS] = MetricRecord(trained.metrics)
    return content


app = ClientApp(mods=[node_state_mod])  # a SuperNode's state-dir keeps its client's state
app.query(protocol.SECAGG_ACTION)(secagg_stage)  # SecAgg+'s key set-up and unmasking


@app.query(protocol.PERSONAL_ACTION)
def evaluate_personal(msg: Message, context: Context) -> Message:
    """This node's client evaluates its own models (global, personalised, and with
    ``PERSONAL_LOCAL_ONLY`` the one it trains alone) on its local test split, with the state
    its node keeps (``fedtune.client.personal.personal_metrics``); the reply is metrics only."""
    resources, client_id, server_round = _setup(msg, context)
    local_only = bool(msg.content[protocol.CONFIG].get(protocol.PERSONAL_LOCAL_ONLY, False))
    metrics = personal_metrics(resources, client_id, server_round,
                               protocol.to_numpy(msg.content[protocol.ARRAYS]), context.state,
                               local_only)
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train(mods=[secagg_train_mod])  # SecAgg+ masks the reply when the server asks for it
def train(msg: Message, context: Context) -> Message:
    """``train_client`` on this node's client, from and to Flower messages."""
    resources, client_id, server_round = _setup(msg, context)
    global_arrays = protocol.to_numpy(msg.content[protocol.ARRAYS])
    trained = train_client(resources, client_id, server_round, msg.content, global_arrays,
                           context.state)
    return Message(content=reply_content(trained), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """``evaluate_client`` on this node's client, from and to Flower messages."""
    resources, client_id, _ = _setup(msg, context)
    metrics = evaluate_client(resources, client_id,
                              protocol.to_numpy(msg.content[protocol.ARRAYS]))
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)
