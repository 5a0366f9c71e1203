"""The generated federation: a million clients dealt from one pool, no memory per client."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.data.federation import ClientSizes, build_federation
from fedtune.data.replicated import replicated_shards
from fedtune.server.grid import NodeRange
from tests.conftest import rows_of, tiny_config

GENERATED = ["data.dataset=generated", "data.partitioner=iid", "data.max_examples=0",
             "model.kind=mlp", "model.hidden_sizes=[8]"]


def test_a_million_clients_are_dealt_from_the_pool_by_seed():
    config = load_config(None, [*GENERATED, "data.num_clients=1000000",
                                "data.client_examples=8", "data.local_test_fraction=0.25"])
    federation = build_federation(config.data, config.run.seed)
    assert federation.num_clients == 1_000_000
    sizes = federation.train_sizes
    assert sizes.shape == (1_000_000,) and set(sizes[:10].tolist()) == {6}
    assert sizes.strides == (0,)  # one number, however many clients
    pool = np.setdiff1d(np.arange(len(federation.data)), federation.test_rows)
    for client in (0, 1, 999_999):  # 8 distinct rows of the pool, 2 of them local test
        rows = federation.client_rows(client)
        assert len(np.unique(rows)) == 8 and np.isin(rows, pool).all()
        assert len(federation.client_test_rows[client]) == 2
    # clients' windows start all over the shuffled pool: 2,000 clients see most of it
    seen = np.unique(np.concatenate([federation.client_rows(c) for c in range(2000)]))
    assert len(seen) > 0.5 * len(pool)
    # every process derives the same shards from the config alone
    again = replicated_shards(pool, 1_000_000, 8, 0.25, seed=_partition_seed(config))
    assert np.array_equal(again[0][999_999], federation.client_train_rows[999_999])
    other = replicated_shards(pool, 1_000_000, 8, 0.25, seed=_partition_seed(config) + 1)
    assert not np.array_equal(other[0][999_999], federation.client_train_rows[999_999])
    # the histogram, a chunk of clients at a time, is each client's own count
    histogram = federation.label_histogram()
    assert histogram.sum() == 8_000_000
    for client in (0, 65_535, 65_536, 999_999):
        counts = np.bincount(federation.data.labels[federation.client_rows(client)],
                             minlength=2)
        assert np.array_equal(histogram[client], counts), client


def _partition_seed(config) -> int:
    from fedtune.data.federation import _PARTITION, stage_seed

    return stage_seed(config.run.seed, _PARTITION)


def test_sizes_and_nodes_travel_in_constant_space():
    same = ClientSizes(np.full(1_000_000, 7))
    assert len(same) == 1_000_000 and same[999_999] == 7 and len(pickle.dumps(same)) < 1000
    mixed = ClientSizes(np.array([3, 5, 4]))
    assert list(mixed) == [3, 5, 4] and bool(mixed) and not ClientSizes(np.zeros(0))
    with pytest.raises(IndexError):
        mixed[3]
    nodes = NodeRange(1000, 1_000_000)
    assert nodes[1000] == 0 and nodes[1_000_999] == 999_999 and len(nodes) == 1_000_000
    assert 999 not in nodes and 1_001_000 not in nodes and nodes.get(5) is None
    assert len(pickle.dumps(nodes)) < 1000
    with pytest.raises(KeyError):
        nodes[1_001_000]


def test_the_generated_federation_refuses_what_it_cannot_deal():
    with pytest.raises(ConfigError, match="data.partitioner = 'dirichlet' is not allowed with "
                                          "data.dataset = 'generated': must be 'iid'"):
        load_config(None, [*GENERATED, "data.partitioner=dirichlet"])
    config = load_config(None, [*GENERATED, "data.client_examples=20000"])
    with pytest.raises(ConfigError, match="data.client_examples = 20000 is not allowed: must "
                                          "be <= 18000"):
        build_federation(config.data, config.run.seed)


def test_a_hundred_thousand_client_run_trains_its_sampled_clients(tmp_path):
    config = tiny_config(tmp_path, base=[
        *GENERATED, "engine.backend=inprocess", "data.num_clients=100000", "run.rounds=1",
        "strategy.fraction_train=0.0002", "strategy.fraction_evaluate=0", "client.local_steps=1",
        "client.batch_size=4", "client.lr=0.05"])
    from fedtune.engine.inprocess import run_inprocess

    run_dir = run_inprocess(config).path
    clients = rows_of(run_dir / "clients.csv")
    assert len(clients) == 20 and {r["status"] for r in clients} == {"ok"}
    assert max(int(r["client_id"]) for r in clients) > 20_000  # beyond the pool's size
    assert {r["num_examples"] for r in clients} == {"7"}
    assert len(rows_of(run_dir / "partitions.csv")) == 100_000
