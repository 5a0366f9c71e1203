"""A replicated federation: any number of clients, each holding ``data.client_examples``
examples of one training pool, with no per-client memory.

For populations far beyond a dataset's size (issue 30: 10^6 registered clients) the clients'
shards are derived, never stored. The pool is shuffled once by the run's seed; client ``i``
holds the ``k`` consecutive rows of the shuffled pool (wrapping around) from a start that a
SplitMix64 hash of ``(seed, i)`` picks (Steele, Lea & Flood 2014, "Fast splittable
pseudorandom number generators"; its finaliser as a stateless hash, so that any client's
start - or a million of them at once, for the label histogram - costs a few integer operations
and no generator). A client's rows are distinct; two clients overlap where their windows do, as
independent draws would. Every process derives the same shard from the config alone. The
first ``local_test`` rows of a client's window are its local test split, as
``fedtune.data.federation`` splits a partition. The clients are IID: a replicated federation is
for measuring the engine at scale, not for non-IID studies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

HISTOGRAM_CHUNK = 1 << 16  # clients whose windows the label histogram gathers at once
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of each value (uint64 arithmetic wraps around)."""
    z = values.astype(np.uint64) * _GOLDEN + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    return z ^ (z >> np.uint64(31))


def local_test_size(examples: int, fraction: float) -> int:
    """How many of a client's examples are its local test split (as ``_split_local_test``)."""
    if fraction == 0 or examples < 2:
        return 0
    return min(max(1, round(fraction * examples)), examples - 1)


class ReplicatedDeal:
    """The deal: the shuffled pool, examples per client, the seed; shards and label counts
    derived on demand."""

    def __init__(self, pool: np.ndarray, num_clients: int, examples: int, local_test: int,
                 seed: int) -> None:
        if examples > len(pool):
            raise ValueError(f"{examples} examples per client from a pool of {len(pool)}")
        self.shuffled = pool[np.random.default_rng(seed).permutation(len(pool))]
        self.num_clients = num_clients
        self.examples = examples
        self.local_test = local_test
        self._key = splitmix64(np.array([seed]))[0]  # clients' hashes differ run to run

    def windows(self, clients: np.ndarray) -> np.ndarray:
        """Positions in the shuffled pool of each client's rows, one row per client."""
        size = np.uint64(len(self.shuffled))
        starts = splitmix64(clients.astype(np.uint64) ^ self._key) % size
        offsets = np.arange(self.examples, dtype=np.uint64)
        return ((starts[:, None] + offsets) % size).astype(np.int64)

    def rows(self, client: int) -> np.ndarray:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} of {self.num_clients}")
        return self.shuffled[self.windows(np.array([client]))[0]]

    def label_histogram(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """Examples per (client, label), a chunk of clients at a time (one gather and one
        bincount each)."""
        histogram = np.zeros((self.num_clients, num_labels), dtype=np.int64)
        for first in range(0, self.num_clients, HISTOGRAM_CHUNK):
            clients = np.arange(first, min(first + HISTOGRAM_CHUNK, self.num_clients))
            dealt = labels[self.shuffled[self.windows(clients)]]
            cells = (clients - first)[:, None] * num_labels + dealt
            histogram[clients] = np.bincount(
                cells.ravel(), minlength=len(clients) * num_labels).reshape(-1, num_labels)
        return histogram


class ReplicatedShards(Sequence[np.ndarray]):
    """The clients' training (or local test) rows of a deal, as a sequence of index arrays;
    ``sizes`` without deriving any shard (every client holds the same number)."""

    def __init__(self, deal: ReplicatedDeal, test: bool) -> None:
        self.deal = deal
        self.test = test

    def __len__(self) -> int:
        return self.deal.num_clients

    def __getitem__(self, client: int) -> np.ndarray:  # type: ignore[override]
        rows = self.deal.rows(client)
        cut = self.deal.local_test
        return np.sort(rows[:cut] if self.test else rows[cut:])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[client] for client in range(len(self)))

    @property
    def sizes(self) -> np.ndarray:
        """Every client's size, as a read-only broadcast array (no memory per client)."""
        size = self.deal.local_test if self.test else self.deal.examples - self.deal.local_test
        return np.broadcast_to(np.int64(size), (len(self),))


def replicated_shards(pool: np.ndarray, num_clients: int, examples: int,
                      local_test_fraction: float, seed: int
                      ) -> tuple[ReplicatedShards, ReplicatedShards]:
    """The training and local test shards of ``num_clients`` clients of ``examples`` each."""
    deal = ReplicatedDeal(pool, num_clients, examples,
                          local_test_size(examples, local_test_fraction), seed)
    return ReplicatedShards(deal, test=False), ReplicatedShards(deal, test=True)
