"""Split a pool of examples over clients: each function returns one index array per client.

The splitting itself is done by flwr-datasets partitioners (IID, Dirichlet over labels,
pathological label shards, sizes, natural ids); these functions only feed them a table of
(row, label, key), seed them, and turn their partitions back into index arrays. Every example
of the pool lands in exactly one client, which ``check_partition`` asserts.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    InnerDirichletPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)

from fedtune.config import ConfigError

ROW = "row"
LABEL = "label"
CLIENT = "client"


def _table(columns: dict[str, np.ndarray]) -> Dataset:
    return Dataset.from_dict({name: values.tolist() for name, values in columns.items()})


def _indices(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    """Original row numbers of each partition, sorted."""
    partitioner.load_partition(0)  # the partitioner assigns every row on first use
    by_position = getattr(partitioner, "partition_id_to_indices", None)
    if by_position is not None:  # one lookup instead of one Dataset.select per client
        rows = np.asarray(partitioner.dataset[ROW], dtype=np.int64)
        return [np.sort(rows[np.asarray(by_position[i], dtype=np.int64)])
                for i in range(num_clients)]
    return [
        np.sort(np.asarray(partitioner.load_partition(i)[ROW], dtype=np.int64))
        for i in range(num_clients)
    ]


def partition_iid(num_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then near-equal contiguous shards.

    The same split as flwr-datasets' IidPartitioner (``Dataset.shard(contiguous=True)``), done
    through its SizePartitioner, which hands back all partitions at once: 10,000 clients take
    milliseconds instead of one ``Dataset.shard`` call each.
    """
    if num_clients > num_rows:
        raise ConfigError(
            f"data.num_clients = {num_clients} is not allowed: must be <= {num_rows} "
            "(training examples)"
        )
    rows = np.random.default_rng(seed).permutation(num_rows)
    sizes = [len(chunk) for chunk in np.array_split(np.arange(num_rows), num_clients)]
    partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = _table({ROW: rows})
    return _indices(partitioner, num_clients)


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Label skew: each label's examples split by Dirichlet(alpha) weights.

    Hsu et al. 2019 / Yurochkin et al. 2019, via flwr-datasets DirichletPartitioner; a draw
    that leaves any client below ``min_size`` examples is redrawn.
    """
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by=LABEL,
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _table({ROW: np.arange(len(labels)), LABEL: labels})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _indices(partitioner, num_clients)
    except ValueError as err:
        raise ConfigError(
            f"data.alpha = {alpha:g} with data.num_clients = {num_clients} and "
            f"data.min_client_examples = {min_size} is not allowed: no Dirichlet draw gave every "
            f"client {min_size} examples ({err}); use fewer clients or a larger alpha"
        ) from None


def partition_inner_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew at cross-device scale: clients of equal size (±1), each drawing its label
    mix from Dirichlet(alpha) (Acar et al. 2021's sampling, via flwr-datasets
    InnerDirichletPartitioner; a label that runs out is dropped from the mix).

    Unlike ``partition_dirichlet``, which splits each label over the clients and so leaves
    some of hundreds of clients nearly empty, every client gets its share of the data.
    """
    sizes = [len(chunk) for chunk in np.array_split(np.arange(len(labels)), num_clients)]
    partitioner = InnerDirichletPartitioner(partition_sizes=sizes, partition_by=LABEL,
                                            alpha=alpha, shuffle=True, seed=seed)
    partitioner.dataset = _table({ROW: np.arange(len(labels)), LABEL: labels})
    return _indices(partitioner, num_clients)


def partition_shards(
    labels: np.ndarray, num_clients: int, labels_per_client: int, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID: each client holds exactly ``labels_per_client`` labels.

    McMahan et al. 2017 / Li et al. 2022 ("first-deterministic" assignment), via flwr-datasets
    PathologicalPartitioner.
    """
    num_labels = len(np.unique(labels))
    if labels_per_client > num_labels:
        raise ConfigError(
            f"data.labels_per_client = {labels_per_client} is not allowed: must be <= "
            f"{num_labels} (labels in the dataset)"
        )
    if num_clients < num_labels:
        raise ConfigError(
            f"data.num_clients = {num_clients} is not allowed with data.partitioner = 'shards': "
            f"must be >= {num_labels} (labels in the dataset) so that every label has a client"
        )
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by=LABEL,
        num_classes_per_partition=labels_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _table({ROW: np.arange(len(labels)), LABEL: labels})
    return _indices(partitioner, num_clients)


def quantity_skew_sizes(
    num_rows: int, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[int]:
    """Client sizes: min_size each plus the rest split by Dirichlet(alpha) weights."""
    spare = num_rows - num_clients * min_size
    if spare < 0:
        raise ConfigError(
            f"data.num_clients = {num_clients} is not allowed: with data.min_client_examples = "
            f"{min_size} it needs {num_clients * min_size} examples, the pool has {num_rows}"
        )
    weights = np.random.default_rng(seed).dirichlet(np.full(num_clients, alpha))
    extra = np.floor(weights * spare).astype(np.int64)
    # largest remainders take the rows that flooring left over, so sizes sum to num_rows
    leftover = spare - int(extra.sum())
    extra[np.argsort(-(weights * spare - extra), kind="stable")[:leftover]] += 1
    return [int(min_size + e) for e in extra]


def partition_quantity_skew(
    num_rows: int, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Quantity skew: IID labels, client sizes drawn from Dirichlet(alpha) (flwr-datasets
    SizePartitioner over a seeded shuffle)."""
    sizes = quantity_skew_sizes(num_rows, num_clients, alpha, min_size, seed)
    rows = np.random.default_rng(seed + 1).permutation(num_rows)
    partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = _table({ROW: rows})
    return _indices(partitioner, num_clients)


def partition_natural(keys: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Natural partition: all examples sharing a key (e.g. a movie) go to one client.

    With more keys than clients, the keys are shuffled (seeded) and dealt into
    ``num_clients`` groups of nearly equal key count; flwr-datasets NaturalIdPartitioner then
    splits by group.
    """
    unique = np.unique(keys)
    if num_clients > len(unique):
        raise ConfigError(
            f"data.num_clients = {num_clients} is not allowed with data.partitioner = 'natural': "
            f"must be <= {len(unique)} (distinct keys)"
        )
    shuffled = np.random.default_rng(seed).permutation(unique)
    group_of = {
        key: client
        for client, group in enumerate(np.array_split(shuffled, num_clients))
        for key in group
    }
    clients = np.array([group_of[k] for k in keys], dtype=np.int64)
    partitioner = NaturalIdPartitioner(partition_by=CLIENT)
    partitioner.dataset = _table({ROW: np.arange(len(keys)), CLIENT: clients})
    # NaturalIdPartitioner numbers partitions by sorted id, so partition i is group i;
    # it draws a tqdm bar on stderr for a sub-second loop, which is kept off the terminal
    with contextlib.redirect_stderr(io.StringIO()):
        return _indices(partitioner, num_clients)


def check_partition(parts: Sequence[np.ndarray], num_rows: int) -> None:
    """Assert that every row is in exactly one client."""
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    if len(joined) != num_rows or not np.array_equal(np.sort(joined), np.arange(num_rows)):
        raise AssertionError(
            f"partition is not exact: {len(joined)} assignments for {num_rows} rows, "
            f"{num_rows - len(np.unique(joined))} rows missing"
        )
