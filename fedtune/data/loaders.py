"""PyTorch DataLoaders over rows of an encoded dataset.

A loader yields ``(inputs, labels)``: ``inputs`` is the keyword dict a model's ``forward`` takes
(``input_ids`` + ``attention_mask`` for transformers, ``features`` for the MLP). Batches are
built from row numbers, so a client's loader holds an index array, never a copy of the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from fedtune.data.encode import Batch, Encoded, text_lengths


class RowDataset(Dataset):
    """Dataset whose items are row numbers; ``collate`` turns a list of rows into a batch."""

    def __init__(self, encoded: Encoded, labels: np.ndarray, rows: np.ndarray) -> None:
        self.encoded = encoded
        self.labels = labels
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> int:
        return int(self.rows[position])

    def collate(self, rows: list[int] | np.ndarray) -> Batch:
        picked = np.asarray(rows, dtype=np.int64)
        return self.encoded.pad(picked), torch.from_numpy(self.labels[picked])


def _batch_size(rows: np.ndarray, batch_size: int) -> int:
    """A client's training batch size: ``batch_size``, or all its rows where it holds fewer
    (at least one)."""
    return min(batch_size, max(1, len(rows)))


def _epoch_order(rows: np.ndarray, generator: torch.Generator,
                 base: torch.Tensor | None = None) -> np.ndarray:
    """``rows`` in one epoch's order: the draws a shuffling DataLoader makes from
    ``generator`` for an epoch (its base seed, then its RandomSampler's permutation).
    ``base``: an int64 scalar tensor to draw the base seed into (a caller ordering many
    clients' rows reuses one: a new tensor each time costs ~1.7 us a client)."""
    if base is None:
        base = torch.empty((), dtype=torch.int64)
    base.random_(generator=generator)  # the base seed
    return rows[torch.randperm(len(rows), generator=generator).numpy()]


class ShuffledRows:
    """The row numbers of the batches ``DataLoader(dataset, batch_size, shuffle=True,
    generator=generator)`` yields, in the same order (the same draws from ``generator``:
    DataLoader's base seed, then its RandomSampler's permutations), without DataLoader's
    per-iteration machinery - for a small client that takes one step, creating a DataLoader
    iterator costs more than the step. Each iteration is a new epoch (new draws)."""

    epoch_draws = 0  # values an epoch draws from torch's default generator (none)

    def __init__(self, rows: np.ndarray, batch_size: int, generator: torch.Generator) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        n = len(self.rows)
        order = _epoch_order(self.rows, self.generator)
        for start in range(0, n, self.batch_size):
            yield order[start:start + self.batch_size]
        # RandomSampler draws a second, unused permutation once the first is used up (not
        # when the epoch stops early: a loader iterated again stays in step)
        torch.randperm(n, generator=self.generator)


class SampledRows:
    """The row numbers of the batches a DataLoader over ``sampler`` yields, epoch by epoch
    (the sampler draws from its own generator; DataLoader's base seed, drawn from torch's
    global generator, picks no rows)."""

    epoch_draws = 1  # DataLoader's base seed, from torch's default generator, every epoch

    def __init__(self, rows: np.ndarray, batch_size: int, sampler: Sampler) -> None:
        self.rows = rows
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[np.ndarray]:
        for positions in self.batches:
            yield self.rows[positions]


class RowBatches:
    """Batches collated from the row numbers of ``rows`` (``ShuffledRows``), epoch by epoch."""

    def __init__(self, dataset: RowDataset, rows: ShuffledRows) -> None:
        self.dataset = dataset
        self.row_batches = rows

    def __len__(self) -> int:
        return len(self.row_batches)

    def __iter__(self) -> Iterator[Batch]:
        for picked in self.row_batches:
            yield self.dataset.collate(picked)


def train_rows(encoded: Encoded, rows: np.ndarray, batch_size: int, seed: int
               ) -> ShuffledRows | SampledRows:
    """The row numbers of ``train_loader``'s batches, epoch by epoch: the same draws, so the
    same batches (clients trained together gather a chunk's batches at once from these)."""
    rows = np.asarray(rows, dtype=np.int64)
    batch_size = _batch_size(rows, batch_size)
    generator = torch.Generator().manual_seed(seed)
    lengths = text_lengths(encoded, rows)
    if lengths is not None:
        return SampledRows(rows, batch_size, _length_grouped(batch_size, lengths, generator))
    return ShuffledRows(rows, batch_size, generator)


def first_epoch_batches(encoded: Encoded, rows: Sequence[np.ndarray], batch_size: int,
                        seeds: Sequence[int], steps: int
                        ) -> tuple[list[list[np.ndarray]], list[int]] | None:
    """For each client k, the first ``steps`` batches ``train_rows(encoded, rows[k],
    batch_size, seeds[k])`` yields and its batches per epoch, where those are shuffled rows (no
    texts behind them, ``ShuffledRows``) and every client's ``steps`` fit in its first epoch;
    None otherwise. The same draws (``_epoch_order``) from one generator seeded again for
    each client, instead of a generator and a loader each: ~5 us a client less, for a chunk
    of clients trained together (``fedtune.client.vectorised``)."""
    sizes = [_batch_size(r, batch_size) for r in rows]
    if (steps < 1 or text_lengths(encoded, np.empty(0, np.int64)) is not None
            or any((steps - 1) * size >= len(r) for r, size in zip(rows, sizes, strict=True))):
        return None
    generator, base = torch.Generator(), torch.empty((), dtype=torch.int64)
    batches = []
    for client_rows, size, seed in zip(rows, sizes, seeds, strict=True):
        order = _epoch_order(np.asarray(client_rows, dtype=np.int64),
                             generator.manual_seed(seed), base)
        batches.append([order[start:start + size] for start in range(0, steps * size, size)])
    return batches, [-(-len(r) // size) for r, size in zip(rows, sizes, strict=True)]


def _length_grouped(batch_size: int, lengths: np.ndarray, generator: torch.Generator
                    ) -> Sampler:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler(batch_size, lengths=lengths.tolist(), generator=generator)


def train_loader(
    encoded: Encoded, labels: np.ndarray, rows: np.ndarray, batch_size: int, seed: int
) -> DataLoader | RowBatches:
    """Shuffled batches; the order depends only on ``seed``.

    Texts are grouped by length (transformers' LengthGroupedSampler: shuffle, sort within
    mega-batches of 50 batches, shuffle the batches), so dynamic padding pads little: on
    Rotten Tomatoes this cuts the tokens a step computes on by about a third. Pooled features
    of texts are grouped the same way, so they train on exactly the token path's batches.
    """
    dataset = RowDataset(encoded, labels, rows)
    batch_size = min(batch_size, max(1, len(rows)))
    generator = torch.Generator().manual_seed(seed)
    lengths = text_lengths(encoded, dataset.rows)
    if lengths is not None:
        return DataLoader(dataset, batch_size=batch_size,
                          sampler=_length_grouped(batch_size, lengths, generator),
                          collate_fn=dataset.collate)
    return RowBatches(dataset, ShuffledRows(dataset.rows, batch_size, generator))


class OrderedBatches:
    """The batches ``DataLoader(dataset, batch_size, shuffle=False)`` yields over a
    ``RowDataset``, in order, without DataLoader's per-example indexing: an evaluation runs
    once per client per round, and at small batch sizes that machinery costs more than
    gathering the rows. Each iteration draws DataLoader's base seed from torch's default
    generator, as DataLoader does, so the random streams after an evaluation stay as they were.
    """

    def __init__(self, dataset: RowDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        torch.empty((), dtype=torch.int64).random_()  # DataLoader's base seed
        rows = self.dataset.rows
        for start in range(0, len(rows), self.batch_size):
            yield self.dataset.collate(rows[start:start + self.batch_size])


def eval_loader(
    encoded: Encoded, labels: np.ndarray, rows: np.ndarray, batch_size: int
) -> OrderedBatches:
    """Batches in length order for texts (little padding), in row order otherwise."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = text_lengths(encoded, rows)
    if lengths is not None:
        rows = rows[np.argsort(lengths, kind="stable")]
    return OrderedBatches(RowDataset(encoded, labels, rows), batch_size)
