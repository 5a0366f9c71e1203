"""Sample-level canaries for the one-run audit (Steinke, Nasr, Jagielski 2023): random examples
with random labels, each included with probability 1/2 in the training data of a random client.

A canary's input is drawn in the model's own input space, far from the data so that training
on it leaves a trace an auditor can find: a random direction with the median norm of the real
rows (features, pixels, pooled encoder outputs), random hashed words (bag-of-words), or random
tokens of the corpus (token ids). Its label is uniform over the classes. Canaries are appended
after the real rows; they never enter a test split, so they never count in the reported
accuracy. The same config and seed give the same canaries in every process (server, Ray
workers), which is how every process agrees on who holds what.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedtune.data.encode import (
    DenseFeatures,
    Encoded,
    PooledFeatures,
    SparseFeatures,
    TokenIds,
)
from fedtune.data.federation import Federation

_CANARY_STREAM = 104729  # seeds the canaries as [seed, _CANARY_STREAM]


@dataclass(frozen=True)
class CanaryExamples:
    """Where the canaries are: their rows (after the real ones), whether each was included,
    and which client holds it (when included)."""

    rows: np.ndarray
    included: np.ndarray
    clients: np.ndarray

    @property
    def count(self) -> int:
        return len(self.rows)


def _random_directions(rng: np.random.Generator, values: np.ndarray, count: int) -> np.ndarray:
    norms = np.linalg.norm(values, axis=1)
    scale = float(np.median(norms)) if len(norms) else 1.0
    noise = rng.standard_normal((count, values.shape[1]))
    return (scale * noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype(values.dtype)


def _canary_inputs(encoded: Encoded, count: int, rng: np.random.Generator) -> Encoded:
    """``encoded`` with ``count`` random canary inputs appended."""
    if isinstance(encoded, PooledFeatures):
        extra = _random_directions(rng, encoded.values, count)
        lengths = np.full(count, int(np.median(encoded.lengths)), dtype=encoded.lengths.dtype)
        return PooledFeatures(np.concatenate([encoded.values, extra]),
                              np.concatenate([encoded.lengths, lengths]))
    if isinstance(encoded, DenseFeatures):
        return DenseFeatures(np.concatenate([encoded.values,
                                             _random_directions(rng, encoded.values, count)]))
    if isinstance(encoded, SparseFeatures):
        width = encoded.values.shape[1]
        nnz = max(1, int(np.median(np.diff(encoded.values.indptr))))
        columns = np.stack([rng.choice(width, nnz, replace=False) for _ in range(count)])
        data = np.full(count * nnz, 1 / np.sqrt(nnz), dtype=encoded.values.dtype)
        extra = sp.csr_matrix((data, columns.ravel(), np.arange(0, count * nnz + 1, nnz)),
                              shape=(count, width))
        return SparseFeatures(sp.vstack([encoded.values, extra]).tocsr())
    lengths = np.diff(encoded.offsets)
    length = max(3, int(np.median(lengths)))
    first, last = encoded.ids[0], encoded.ids[encoded.offsets[1] - 1]  # e.g. [CLS], [SEP]
    inner = rng.choice(encoded.ids, size=(count, length - 2))
    texts = np.concatenate([np.full((count, 1), first), inner, np.full((count, 1), last)],
                           axis=1).astype(encoded.ids.dtype)
    offsets = encoded.offsets[-1] + length * np.arange(1, count + 1)
    return TokenIds(np.concatenate([encoded.ids, texts.ravel()]),
                    np.concatenate([encoded.offsets, offsets]), encoded.pad_id)


def insert_canary_examples(federation: Federation, encoded: Encoded, count: int, seed: int
                           ) -> tuple[Federation, Encoded, CanaryExamples]:
    """The federation and inputs with ``count`` canaries appended; each canary is included
    with probability 1/2 in the training rows of a uniformly drawn client."""
    rng = np.random.default_rng([seed, _CANARY_STREAM])
    data = federation.data
    first = len(data)
    rows = np.arange(first, first + count)
    labels = rng.integers(0, data.num_labels, count)
    included = rng.random(count) < 0.5
    clients = rng.integers(0, federation.num_clients, count)
    extended = _canary_inputs(encoded, count, rng)
    texts = None if data.texts is None else data.texts + ("",) * count
    canary_data = dataclasses.replace(
        data, labels=np.concatenate([data.labels, labels]), texts=texts,
        features=None if data.features is None else np.asarray(extended.values),
        keys=None if data.keys is None else {
            k: np.concatenate([v, np.full(count, "", dtype=v.dtype)]) for k, v in
            data.keys.items()})
    train = [list(part) for part in federation.client_train_rows]
    for row, client, inside in zip(rows, clients, included, strict=True):
        if inside:
            train[client].append(row)
    train_rows = tuple(np.sort(np.asarray(part, dtype=np.int64)) for part in train)
    return (dataclasses.replace(federation, data=canary_data, client_train_rows=train_rows),
            extended, CanaryExamples(rows, included, clients))
