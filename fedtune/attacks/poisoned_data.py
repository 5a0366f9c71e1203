"""The examples a data attack trains on: poisoned copies appended after the real rows (as the
audit's canaries are), so every process that builds the same config holds the same rows, and
an attacker trains on its poisoned rows only in the rounds it attacks.

No library holds encoded rows in fedtune's four layouts, so taking and joining them is written
here by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedtune.data.encode import DenseFeatures, Encoded, PooledFeatures, SparseFeatures, TokenIds
from fedtune.data.federation import Federation
from fedtune.data.sources import LabelledData

Encode = Callable[[LabelledData], Encoded]  # the model kind's encoding of a dataset


@dataclass(frozen=True)
class Poisoning:
    """A data attack's rows: the federation and inputs with the poisoned examples appended,
    each attacker's training rows when it attacks, and (a backdoor) the triggered global test
    rows of other labels, labelled with the target."""

    federation: Federation
    encoded: Encoded
    train_rows: dict[int, np.ndarray]
    triggered_test_rows: np.ndarray | None = None


def take(encoded: Encoded, rows: np.ndarray) -> Encoded:
    """The inputs of ``rows``, in order."""
    if isinstance(encoded, TokenIds):
        pieces = [encoded.ids[encoded.offsets[r]:encoded.offsets[r + 1]] for r in rows]
        lengths = np.array([len(p) for p in pieces], dtype=encoded.offsets.dtype)
        ids = np.concatenate(pieces) if pieces else encoded.ids[:0]
        return TokenIds(ids, np.concatenate([[0], np.cumsum(lengths)]).astype(
            encoded.offsets.dtype), encoded.pad_id)
    if isinstance(encoded, PooledFeatures):
        return PooledFeatures(encoded.values[rows], encoded.lengths[rows])
    if isinstance(encoded, SparseFeatures):
        return SparseFeatures(encoded.values[rows])
    return DenseFeatures(encoded.values[rows])


def joined(first: Encoded, second: Encoded) -> Encoded:
    """``second``'s rows after ``first``'s."""
    if isinstance(first, TokenIds):
        offsets = np.concatenate([first.offsets, first.offsets[-1] + second.offsets[1:]])
        return TokenIds(np.concatenate([first.ids, second.ids.astype(first.ids.dtype)]),
                        offsets.astype(first.offsets.dtype), first.pad_id)
    if isinstance(first, PooledFeatures):
        return PooledFeatures(np.concatenate([first.values, second.values]),
                              np.concatenate([first.lengths, second.lengths]))
    if isinstance(first, SparseFeatures):
        return SparseFeatures(sp.vstack([first.values, second.values]).tocsr())
    return DenseFeatures(np.concatenate([first.values, second.values]))


def appended(federation: Federation, encoded: Encoded, copies_of: np.ndarray,
             labels: np.ndarray, inputs: Encoded, texts: list[str] | None = None
             ) -> tuple[Federation, Encoded, np.ndarray]:
    """The federation and inputs with new examples appended (``inputs``, ``labels``; copies of
    rows ``copies_of`` in texts and keys unless ``texts`` are given), and the new rows."""
    data = federation.data
    first = len(data)
    new_rows = np.arange(first, first + len(copies_of))
    if data.texts is not None:
        texts = texts if texts is not None else [data.texts[r] for r in copies_of]
        all_texts: tuple[str, ...] | None = data.texts + tuple(texts)
    else:
        all_texts = None
    extended = dataclasses.replace(
        data, labels=np.concatenate([data.labels, labels.astype(data.labels.dtype)]),
        texts=all_texts,
        features=None if data.features is None else np.concatenate(
            [data.features, data.features[copies_of]]),
        keys=None if data.keys is None else {
            k: np.concatenate([v, v[copies_of]]) for k, v in data.keys.items()})
    return (dataclasses.replace(federation, data=extended), joined(encoded, inputs), new_rows)
