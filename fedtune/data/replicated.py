"""A replicated federation: any number of clients, each drawing ``data.client_examples`` examples
from one training pool, with no per-client memory.

For populations far beyond a dataset's size (issue 30: 10^6 registered clients) the clients'
shards are derived, never stored: the pool's rows are dealt out in a seeded permutation,
``per_pass = len(pool) // k`` clients of ``k`` examples a pass, and when a pass is used up the
next one deals a fresh permutation (pass ``p``'s seed is ``(run seed, stage, p)``), so client
``i`` holds rows ``permutation(i // per_pass)[(i % per_pass) * k:][:k]``. Every process derives
the same shard from the config alone; a shard costs a permutation of the pool when it is asked
for (the last few passes' are kept). Each client's first ``local_test`` rows of its draw are its
local test split, as ``fedtune.data.federation`` splits a partition. The clients are IID: a
replicated federation is for measuring the engine at scale, not for non-IID studies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

PASSES_KEPT = 4  # permutations of the pool kept per process (a cohort spans few passes)


def local_test_size(examples: int, fraction: float) -> int:
    """How many of a client's examples are its local test split (as ``_split_local_test``)."""
    if fraction == 0 or examples < 2:
        return 0
    return min(max(1, round(fraction * examples)), examples - 1)


class ReplicatedDeal:
    """The deal: pool, examples per client, seed; shards and label counts derived on demand."""

    def __init__(self, pool: np.ndarray, num_clients: int, examples: int, local_test: int,
                 seed: int) -> None:
        if examples > len(pool):
            raise ValueError(f"{examples} examples per client from a pool of {len(pool)}")
        self.pool = pool
        self.num_clients = num_clients
        self.examples = examples
        self.local_test = local_test
        self.seed = seed
        self.per_pass = len(pool) // examples
        self._permutation = lru_cache(maxsize=PASSES_KEPT)(self._deal)

    def _deal(self, pass_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, pass_index])
        return self.pool[rng.permutation(len(self.pool))]

    def rows(self, client: int) -> np.ndarray:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} of {self.num_clients}")
        start = (client % self.per_pass) * self.examples
        return self._permutation(client // self.per_pass)[start:start + self.examples]

    def label_histogram(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """Examples per (client, label), a pass at a time (one gather and one bincount each)."""
        histogram = np.zeros((self.num_clients, num_labels), dtype=np.int64)
        for first in range(0, self.num_clients, self.per_pass):
            count = min(self.per_pass, self.num_clients - first)
            dealt = self._deal(first // self.per_pass)[:count * self.examples]
            cells = np.repeat(np.arange(count), self.examples) * num_labels + labels[dealt]
            histogram[first:first + count] = np.bincount(
                cells, minlength=count * num_labels).reshape(count, num_labels)
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

