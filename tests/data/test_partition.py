"""Partitioners and federation splits: exact, seeded, skewed as configured."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.data.federation import build_federation
from fedtune.data.partition import (
    check_partition,
    partition_dirichlet,
    partition_inner_dirichlet,
    partition_iid,
    partition_natural,
    partition_quantity_skew,
    partition_shards,
    quantity_skew_sizes,
)
from fedtune.data.sources import load_dataset

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 5, size=2000)
KEYS = RNG.integers(0, 300, size=2000).astype(str)

PARTITIONERS = {
    "iid": lambda seed: partition_iid(len(LABELS), 10, seed),
    "dirichlet": lambda seed: partition_dirichlet(LABELS, 10, 0.5, 10, seed),
    "inner_dirichlet": lambda seed: partition_inner_dirichlet(LABELS, 10, 0.5, seed),
    "shards": lambda seed: partition_shards(LABELS, 10, 2, seed),
    "quantity_skew": lambda seed: partition_quantity_skew(len(LABELS), 10, 0.5, 10, seed),
    "natural": lambda seed: partition_natural(KEYS, 10, seed),
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_every_example_in_exactly_one_client(name):
    parts = PARTITIONERS[name](seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    check_partition(parts, len(LABELS))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_same_seed_same_split_other_seed_other_split(name):
    first, again, other = (PARTITIONERS[name](s) for s in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def _mean_majority_share(parts, labels):
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])


def test_smaller_alpha_gives_more_label_skew():
    skew = {alpha: _mean_majority_share(partition_dirichlet(LABELS, 10, alpha, 10, 0), LABELS)
            for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.3  # near the IID share of 1/5
    assert skew[0.1] > 0.6


def test_inner_dirichlet_reaches_hundreds_of_clients_with_label_skew():
    """Cross-device scale: 400 clients of 5 examples each from 2,000, where the per-label
    Dirichlet split cannot give every client 4 examples."""
    with pytest.raises(ConfigError, match="no Dirichlet draw gave every client 4 examples"):
        partition_dirichlet(LABELS, 400, 0.5, 4, 0)
    parts = partition_inner_dirichlet(LABELS, 400, 0.5, 0)
    check_partition(parts, len(LABELS))
    assert {len(p) for p in parts} == {5}
    skewed = _mean_majority_share(parts, LABELS)
    balanced = _mean_majority_share(partition_inner_dirichlet(LABELS, 400, 100.0, 0), LABELS)
    assert skewed > balanced + 0.1


def test_shards_give_each_client_exactly_its_labels():
    parts = partition_shards(LABELS, 10, 2, 0)
    assert [len(np.unique(LABELS[p])) for p in parts] == [2] * 10


def test_natural_partition_keeps_each_key_in_one_client():
    parts = partition_natural(KEYS, 7, 0)
    owner = {}
    for client, rows in enumerate(parts):
        for key in np.unique(KEYS[rows]):
            assert owner.setdefault(key, client) == client
    assert len(owner) == len(np.unique(KEYS))


def test_quantity_skew_sizes_vary_sum_up_and_respect_minimum():
    sizes = quantity_skew_sizes(2000, 10, 0.3, 25, 0)
    assert sum(sizes) == 2000 and min(sizes) >= 25
    assert max(sizes) > 3 * min(sizes)
    parts = partition_quantity_skew(2000, 10, 0.3, 25, 0)
    assert [len(p) for p in parts] == sizes


def test_impossible_partitions_raise_config_errors():
    with pytest.raises(ConfigError, match="data.num_clients = 11 is not allowed"):
        partition_natural(np.array(list("abcdefghij")), 11, 0)
    with pytest.raises(ConfigError, match="must be >= 5"):
        partition_shards(LABELS, 3, 1, 0)
    with pytest.raises(ConfigError, match="needs 2000 examples"):
        quantity_skew_sizes(100, 20, 0.5, 100, 0)


def test_federation_splits_are_disjoint_and_cover_the_data():
    config = load_config(None, ["data.dataset=rotten_tomatoes", "data.partitioner=natural",
                                "data.max_examples=0",
                                "data.num_clients=12"])
    fed = build_federation(config.data, seed=0)
    data = load_dataset("rotten_tomatoes")
    everything = np.concatenate([fed.test_rows, *fed.client_train_rows, *fed.client_test_rows])
    assert np.array_equal(np.sort(everything), np.arange(len(data)))
    assert abs(len(fed.test_rows) - 0.1 * len(data)) <= 1
    local_test = sum(len(r) for r in fed.client_test_rows)
    assert 0.08 * len(data) < local_test < 0.1 * len(data)
    # natural: each movie in one client
    movies = data.keys["movie_name"]
    owners = {}
    for client in range(fed.num_clients):
        for movie in np.unique(movies[fed.client_rows(client)]):
            assert owners.setdefault(movie, client) == client
    histogram = fed.label_histogram()
    assert histogram.shape == (12, 2)
    assert histogram.sum() == len(data) - len(fed.test_rows)


def test_global_test_split_is_stratified_and_independent_of_partitioner():
    a = build_federation(load_config(None, ["data.partitioner=iid"]).data, seed=0)
    b = build_federation(load_config(None, ["data.partitioner=dirichlet"]).data, seed=0)
    assert np.array_equal(a.test_rows, b.test_rows)
    labels = a.data.labels
    assert abs(labels[a.test_rows].mean() - labels.mean()) < 0.01


def test_max_examples_subsamples_before_splitting():
    fed = build_federation(load_config(None, ["data.max_examples=1000"]).data, seed=0)
    total = len(fed.test_rows) + sum(len(fed.client_rows(c)) for c in range(fed.num_clients))
    assert total == 1000
