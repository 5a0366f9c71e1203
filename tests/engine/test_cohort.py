"""The cohort fast path: the same results as the ClientApp path, blocks that do not depend on how
they are spread, faults and privacy on the same code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from safetensors.numpy import load_file

from fedtune.client import app as fedtune_client
from fedtune.config import to_run_config
from fedtune.engine.cohort import (
    BLOCKS_PER_ROUND,
    BlockAdder,
    BlockClient,
    BlockResult,
    BlockTask,
    DecodedContent,
    add_blocks,
    block_size,
    block_sums,
    cohort_blocks,
    join_singletons,
    run_block,
    split_block,
)
from fedtune.engine.inprocess import InProcessGrid, act_as_server
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.protocol import ARRAYS, CONFIG, SERVER_ROUND, to_array_record, train_reply_schema
from fedtune.server.app import run_federated
from fedtune.server.grid import CohortSpec
from fedtune.server.screening import ReplyLimits, reply_limits
from fedtune.server.summing import accumulate, weighted_metrics
from fedtune.task import task_resources
from tests.conftest import rows_of, tiny_config

# A ClientApp that is not fedtune's own object: the grid sends it every message one by one.
message_path_app = ClientApp()


@message_path_app.train()
def _train(msg: Message, context: Context) -> Message:
    return fedtune_client.train(msg, context)


@message_path_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return fedtune_client.evaluate_local(msg, context)


SGD = ["client.optimizer=sgd", "client.lr=0.05"]
CASES = {
    "fedavg": [],
    "fedadam": ["strategy.name=fedadam"],
    "fedprox": ["strategy.name=fedprox", "strategy.proximal_mu=0.1"],
    "scaffold": ["strategy.name=scaffold", *SGD],
    "fednova": ["strategy.name=fednova", *SGD, "client.momentum=0.5"],
    "feddyn": ["strategy.name=feddyn"],
    "fedmedian": ["strategy.name=fedmedian"],
    # both paths draw the same noise only when it is seeded (not private)
    "local_dp": ["privacy.mode=local", "privacy.target_epsilon=2", "privacy.delta=1e-3",
                 "privacy.insecure_reproducible_noise=true"],
    "central_dp": ["privacy.mode=central", "privacy.noise_multiplier=0.3",
                   "privacy.delta=1e-3", "privacy.clip_norm=2",
                   "privacy.insecure_reproducible_noise=true"],
    "faults": ["faults.nan_fraction=0.25", "attack.name=scaling", "attack.fraction=0.25",
               "faults.crash_probability=0.3"],
    # the model guard needs each update: the cohort is then kept client by client
    "update_bounds": ["attack.name=scaling", "attack.fraction=0.25", "strategy.update_norm_z=3",
                      "strategy.max_update_norm=0.5"],
}


def _run(tmp_path, name, overrides, client_app):
    # one client at a time: the ClientApp's own code, so the same bits (clients trained
    # together agree to float rounding: tests/engine/test_vectorised.py)
    config = tiny_config(tmp_path / name, *overrides, "run.rounds=3", "data.num_clients=8",
                         "strategy.fraction_train=0.5", "engine.vectorise_clients=false")
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    assert grid.runs_cohorts == (client_app is fedtune_client.app)
    run_dir = run_federated(grid, config).path
    return (rows_of(run_dir / "metrics.csv"), rows_of(run_dir / "clients.csv"),
            load_file(str(run_dir / "model" / "model.safetensors")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cohort_path_gives_the_clientapp_paths_results(tmp_path, case, one_torch_thread):
    """Same clients, same statuses, same weights to 1e-5: the cohort path runs the ClientApp's
    own train function; only FedAvg-family sums differ, in the last bits (float64 block sums
    against Flower's float32 running sum)."""
    fast = _run(tmp_path, "cohort", CASES[case], fedtune_client.app)
    slow = _run(tmp_path, "messages", CASES[case], message_path_app)
    assert [(r["client_id"], r["status"]) for r in fast[1]] == \
           [(r["client_id"], r["status"]) for r in slow[1]]
    assert {r["status"] for r in fast[1]} >= {"ok"}
    for ours, theirs in zip(fast[0], slow[0], strict=True):
        for column in ("train_loss", "eval_accuracy", "epsilon", "max_client_epsilon",
                       "clients_ok", "bytes_up", "bytes_down", "federated_eval_accuracy"):
            if ours[column] and theirs[column]:
                assert float(ours[column]) == pytest.approx(float(theirs[column]), rel=1e-4), \
                    column
            else:
                assert ours[column] == theirs[column], column
    assert fast[2].keys() == slow[2].keys()
    for name in fast[2]:
        np.testing.assert_allclose(fast[2][name], slow[2][name], atol=1e-5, rtol=0)


def test_blocks_depend_on_the_cohort_size_only():
    assert block_size(8) == 1 and block_size(BLOCKS_PER_ROUND) == 1
    assert block_size(1000) == 16 and block_size(10_000) == 157
    clients = [BlockClient(1000 + c, c, None) for c in (5, 3, 9, 1, 7)]
    spec = CohortSpec(weighted_mean=True, limits=ReplyLimits(train_reply_schema("fedavg", "none"),
                                                             decline=None))
    blocks = cohort_blocks(clients, "train", spec)
    assert [[c.client_id for c in b.clients] for b in blocks] == [[1], [3], [5], [7], [9]]


def test_a_split_block_sums_to_the_same_bits_and_block_order_fixes_the_total(tmp_path,
                                                                          one_torch_thread):
    # one client at a time (a chunk of clients trained together is not its singletons' bits)
    config = tiny_config(tmp_path, "data.num_clients=6", "engine.vectorise_clients=false")
    resources = task_resources(config)
    act_as_server(1)
    arrays = shared_state(build_model(resources.spec, 0))
    content = DecodedContent.of(RecordDict({ARRAYS: to_array_record(arrays),
                                            CONFIG: ConfigRecord({SERVER_ROUND: 1})}))
    spec = CohortSpec(weighted_mean=True, limits=reply_limits(config, resources.federation))
    clients = [BlockClient(1000 + c, c, None) for c in range(6)]
    block = BlockTask(0, "train", clients, spec)
    together = run_block(resources, content, block)
    apart = join_singletons(0, [run_block(resources, content, piece)
                                for piece in split_block(block)])
    assert together.weight == apart.weight > 0
    for name in together.total:
        assert np.array_equal(together.total[name], apart.total[name])  # bit for bit
    halves = [BlockTask(i, "train", clients[3 * i:3 * i + 3], spec) for i in (0, 1)]
    forward = add_blocks([run_block(resources, content, half) for half in halves])
    backward = add_blocks([run_block(resources, content, half) for half in halves][::-1])
    assert [r.client_id for r in forward.reports] == list(range(6))
    for name in forward.total:
        assert np.array_equal(forward.total[name], backward.total[name])
    assert json.dumps([r.status for r in forward.reports]) == json.dumps(["ok"] * 6)


@pytest.mark.parametrize("read_only", [False, True])  # read-only: a reply's bytes, read in place
def test_a_whole_weight_is_added_in_one_fused_pass_with_the_bits_of_multiply_then_add(read_only):
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(64, 33)).astype(np.float32) * 10.0 ** rng.integers(-8, 8),
                "b": rng.normal(size=7).astype(np.float32),
                "steps": np.array([3], np.int64)} for _ in range(5)]
    for update in updates:
        for value in update.values():
            value.setflags(write=not read_only)
    for weights in ([3.0, 17.0, 1.0, 2.0**29, 250.0], [0.5, 3.25, 1e-3, 7.0, 2.0**30 + 1]):
        total = block_sums.take(updates[0])
        for update, weight in zip(updates, weights, strict=True):
            accumulate(total, update, weight)
        expected = {name: np.zeros(value.shape, np.float64) for name, value in updates[0].items()}
        for update, weight in zip(updates, weights, strict=True):
            for name, value in update.items():
                expected[name] += np.multiply(value, weight, dtype=np.float64)
        for name in expected:
            assert np.array_equal(total[name], expected[name]), (weights, name)
        block_sums.give_back(total)


def test_weighted_metrics_are_flowers_and_weigh_a_loss_over_the_clients_that_report_one():
    """The summing aggregator's metrics: Flower's ``aggregate_metricrecords`` bit for bit where
    every client carries every key; a train-loss that a client which saw no example leaves out
    is weighted over the clients that carry it (not counted as 0), and one whose carriers hold
    no example is left out."""
    rng = np.random.default_rng(1)
    records = [{"num-examples": int(n), "train-loss": float(rng.random()),
                "duration-s": float(rng.random()), "num-steps": 5} for n in (13, 250, 7, 91)]
    flower = aggregate_metricrecords([RecordDict({"m": MetricRecord(r)}) for r in records],
                                     "num-examples")
    assert weighted_metrics(records) == dict(flower)
    silent = {k: v for k, v in records[1].items() if k != "train-loss"}
    partial = weighted_metrics([records[0], silent, *records[2:]])
    others = [records[0], *records[2:]]
    assert partial["train-loss"] == pytest.approx(
        np.average([r["train-loss"] for r in others], weights=[r["num-examples"] for r in others]),
        rel=1e-15)
    assert partial["duration-s"] == flower["duration-s"]
    nothing = weighted_metrics([{**records[0], "num-examples": 0}, {**silent, "num-examples": 3}])
    assert "train-loss" not in nothing and nothing["num-steps"] == 5


def test_block_sums_are_reused_zeroed_and_blocks_may_come_in_any_order():
    like = {"w": np.ones((3, 4), np.float32)}
    first = block_sums.take(like)
    first["w"] += 5.0
    block_sums.give_back(first)
    again = block_sums.take(like)
    assert again is first and not again["w"].any()  # the same arrays, zeroed
    blocks = []
    for index in range(4):
        block = BlockResult(index, [], total=block_sums.take(like), weight=1.0)
        block.total["w"] += 0.1 * (index + 1) ** 3
        blocks.append(block)
    v = [0.1 * (index + 1) ** 3 for index in range(4)]
    expected = np.full((3, 4), ((v[0] + v[1]) + v[2]) + v[3])  # in block order
    adder = BlockAdder()
    for index in (2, 0, 3):
        adder.add(blocks[index])
    with pytest.raises(ValueError, match=r"blocks \[2, 3\] came without block 1"):
        adder.result()
    adder.add(blocks[1])
    cohort = adder.result()
    assert np.array_equal(cohort.total["w"], expected) and cohort.total_weight == 4.0
    assert all(block.total is None for block in blocks)  # their sums went back for reuse
