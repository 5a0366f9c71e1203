"""From a data config to a federation: global test split, client partitions, local test splits.

Everything is index arrays into one ``LabelledData``; nothing is copied per client, so memory
does not grow with the number of clients. The same config and seed give the same federation in
every process (server, Ray workers, SuperNodes), which is how clients find their shard.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.model_selection import train_test_split

from fedtune.config import ConfigError, ConfigWarning, DataSection
from fedtune.data.files import load_party_file
from fedtune.data.partition import (
    check_partition,
    partition_dirichlet,
    partition_iid,
    partition_inner_dirichlet,
    partition_natural,
    partition_quantity_skew,
    partition_shards,
)
from fedtune.data.sources import LabelledData, load_dataset
from fedtune.tables.datasets import DATASETS

# Independent seed streams per random stage, so changing one stage leaves the others alone.
_SUBSAMPLE, _TEST_SPLIT, _PARTITION, _LOCAL_SPLIT, _LOCAL_VAL = range(5)
# a global test file below this is warned about: its accuracy has a standard error up to 0.05
MIN_TEST_EXAMPLES = 100


def stage_seed(seed: int, stage: int) -> int:
    """A 32-bit seed for one random stage of data preparation."""
    return int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])


@dataclass(frozen=True)
class Federation:
    """Who holds what: rows of ``data`` for the global test and for each client."""

    data: LabelledData
    test_rows: np.ndarray
    client_train_rows: tuple[np.ndarray, ...]
    client_test_rows: tuple[np.ndarray, ...]
    # data.local_val_fraction: rows held out of each client's training rows for personalised
    # model selection (empty without one)
    client_val_rows: tuple[np.ndarray, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.client_train_rows)

    def client_rows(self, client_id: int) -> np.ndarray:
        """All rows of one client (train and local test)."""
        return np.concatenate([self.client_train_rows[client_id], self.client_test_rows[client_id]])

    def label_histogram(self) -> np.ndarray:
        """Examples per (client, label), train and local test together."""
        if self.num_clients == 0:  # the server of a files dataset sees no client data
            return np.zeros((0, self.data.num_labels), dtype=np.int64)
        return np.stack([
            np.bincount(self.data.labels[self.client_rows(c)], minlength=self.data.num_labels)
            for c in range(self.num_clients)
        ])


def _split_global_test(labels: np.ndarray, cfg: DataSection, seed: int
                       ) -> tuple[np.ndarray, ...]:
    """Hold out ``data.test_fraction`` (stratified by label where every label can be on both
    sides); too few examples for a split is a ConfigError, not scikit-learn's."""
    rows = np.arange(len(labels))
    num_test = math.ceil(cfg.test_fraction * len(rows))  # what train_test_split takes
    num_train = len(rows) - num_test
    if num_test < 1 or num_train < 1:
        raise ConfigError(
            f"data.test_fraction = {cfg.test_fraction:g} of {len(rows)} examples (data."
            f"max_examples = {cfg.max_examples}) is not allowed: leaves {num_train} for "
            f"training and {num_test} for the global test set; must leave at least one on "
            "each side"
        )
    counts = np.bincount(labels)
    present = counts[counts > 0]
    stratified = present.min() >= 2 and min(num_test, num_train) >= len(present)
    train, test = train_test_split(rows, test_size=num_test, random_state=seed,
                                   stratify=labels if stratified else None)
    return np.sort(train), np.sort(test)


def _split_local_test(rows: np.ndarray, fraction: float, rng: np.random.Generator):
    """Hold out a local test split; at least one example stays for training."""
    if fraction == 0 or len(rows) < 2:
        return rows, rows[:0]
    num_test = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    shuffled = rng.permutation(rows)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def _partition_pool(cfg: DataSection, data: LabelledData, pool: np.ndarray, seed: int):
    labels = data.labels[pool]
    n = cfg.num_clients
    if n > len(pool):
        raise ConfigError(
            f"data.num_clients = {n} is not allowed: must be <= {len(pool)} "
            f"(training examples of {data.name} once data.test_fraction = "
            f"{cfg.test_fraction:g} is held out)"
        )
    if cfg.partitioner == "iid":
        return partition_iid(len(pool), n, seed)
    if cfg.partitioner == "dirichlet":
        return partition_dirichlet(labels, n, cfg.alpha, cfg.min_client_examples, seed)
    if cfg.partitioner == "inner_dirichlet":
        return partition_inner_dirichlet(labels, n, cfg.alpha, seed)
    if cfg.partitioner == "shards":
        return partition_shards(labels, n, cfg.labels_per_client, seed)
    if cfg.partitioner == "quantity_skew":
        return partition_quantity_skew(len(pool), n, cfg.quantity_alpha,
                                       cfg.min_client_examples, seed)
    key = cfg.natural_key or data.default_key
    if not data.keys or key not in data.keys:
        allowed = ", ".join(repr(k) for k in (data.keys or {})) or "none (no natural key)"
        raise ConfigError(
            f"data.natural_key = {key!r} is not allowed for data.dataset = {data.name!r}: "
            f"must be one of {allowed}"
        )
    return partition_natural(data.keys[key][pool], n, seed)


def build_federation(cfg: DataSection, seed: int, data_path: str = "") -> Federation:
    """Subsample (optional), hold out the global test set, partition, split local tests.

    For ``data.dataset = "files"`` the server's federation is the global test file alone, and a
    SuperNode's (``data_path``) is its own file as client 0, split into train and local test.
    """
    values = tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(cfg))
    return _build_cached(values, seed, data_path)


def _files_federation(cfg: DataSection, seed: int, data_path: str) -> Federation:
    labels = tuple(cfg.label_names)
    if not data_path:
        data = load_party_file(cfg.test_path, labels, cfg.text_column, cfg.label_column)
        if len(data) < MIN_TEST_EXAMPLES:
            warnings.warn(ConfigWarning(
                f"data.test_path = {cfg.test_path!r} holds {len(data)} examples: a test "
                f"accuracy on it moves in steps of {1 / len(data):.2g} and its standard error "
                f"reaches {0.5 / math.sqrt(len(data)):.2g}; {MIN_TEST_EXAMPLES} or more make it "
                "mean something"), stacklevel=2)
        return Federation(data, np.arange(len(data)), (), ())
    data = load_party_file(data_path, labels, cfg.text_column, cfg.label_column)
    rng = np.random.default_rng(stage_seed(seed, _LOCAL_SPLIT))
    train, test = _split_local_test(np.arange(len(data)), cfg.local_test_fraction, rng)
    return Federation(data, np.arange(0), (train,), (test,))


@lru_cache(maxsize=4)
def _build_cached(cfg_values: tuple, seed: int, data_path: str) -> Federation:
    cfg = DataSection(*cfg_values)
    if DATASETS[cfg.dataset].party_files:
        return _files_federation(cfg, seed, data_path)
    data = load_dataset(cfg.dataset)
    rows = np.arange(len(data))
    if cfg.max_examples:
        if cfg.max_examples < len(data):
            rng = np.random.default_rng(stage_seed(seed, _SUBSAMPLE))
            rows = np.sort(rng.choice(rows, size=cfg.max_examples, replace=False))
    pool_pos, test_pos = _split_global_test(data.labels[rows], cfg, stage_seed(seed, _TEST_SPLIT))
    pool, test_rows = rows[pool_pos], rows[test_pos]
    parts = _partition_pool(cfg, data, pool, stage_seed(seed, _PARTITION))
    check_partition(parts, len(pool))
    rng = np.random.default_rng(stage_seed(seed, _LOCAL_SPLIT))
    train, test = zip(*(_split_local_test(pool[p], cfg.local_test_fraction, rng) for p in parts))
    # its own seed stream: without a validation split every other split stays as it was
    val_rng = np.random.default_rng(stage_seed(seed, _LOCAL_VAL))
    train, val = zip(*(_split_local_test(rows, cfg.local_val_fraction, val_rng)
                       for rows in train))
    return Federation(data=data, test_rows=test_rows, client_train_rows=tuple(train),
                      client_test_rows=tuple(test), client_val_rows=tuple(val))
