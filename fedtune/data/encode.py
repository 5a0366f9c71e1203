"""Turn a dataset into model inputs once per process: token ids, hashed bag-of-words, features,
or the pooled output of a frozen encoder.

Tokenization (per dataset, tokenizer and max_length) and feature hashing (per dataset and
feature count) run once and are cached in memory and on disk (``$FEDTUNE_CACHE`` or
``~/.cache/fedtune``), so simulated clients, Ray workers and repeated runs reuse them. Texts
are stored as ragged id arrays; batches are padded to their own longest text (dynamic
padding) when they are built.

Pooled encoder outputs (``model.transfer = "frozen"``) are cached the same way, keyed by the
model's files, the data, max_length and pooling (``cached_pooled_features``); the model kind
computes them (``fedtune.models.hf``), this module only stores them. The first process to need
them computes them under a file lock while the others wait, then every process reads the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from fedtune.data.sources import LabelledData

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


@dataclass(frozen=True)
class TokenIds:
    """Ragged token ids: text i is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray
    offsets: np.ndarray
    pad_id: int

    def length(self, row: int) -> int:
        return int(self.offsets[row + 1] - self.offsets[row])

    def pad(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        width = int(lengths.max()) if len(rows) else 1
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, :n] = self.ids[self.offsets[row]:self.offsets[row] + n]
            mask[i, :n] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


@dataclass(frozen=True)
class DenseFeatures:
    values: np.ndarray

    def pad(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {"features": torch.from_numpy(self.values[rows])}


@dataclass(frozen=True)
class SparseFeatures:
    values: sp.csr_matrix

    def pad(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Dense rows, gathered straight from the CSR arrays (scipy's row indexing builds a
        new sparse matrix first, which costs more than a small client's step)."""
        matrix, rows = self.values, np.asarray(rows)
        starts = matrix.indptr[rows]
        lengths = matrix.indptr[rows + 1] - starts
        # the positions of every stored value of these rows in data/indices, row after row
        shift = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))
        positions = np.arange(lengths.sum()) + np.repeat(shift, lengths)
        dense = np.zeros((len(rows), matrix.shape[1]), dtype=matrix.dtype)
        dense[np.repeat(np.arange(len(rows)), lengths), matrix.indices[positions]] = \
            matrix.data[positions]
        return {"features": torch.from_numpy(dense)}


@dataclass(frozen=True)
class PooledFeatures:
    """A frozen encoder's pooled output per text (``values``), with each text's token count
    (``lengths``) so that batches group texts as the token path does (same batches, same
    results)."""

    values: np.ndarray
    lengths: np.ndarray

    def pad(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {"features": torch.from_numpy(self.values[rows])}


Encoded = TokenIds | DenseFeatures | SparseFeatures | PooledFeatures


def text_lengths(encoded: Encoded, rows: np.ndarray) -> np.ndarray | None:
    """Token counts of ``rows`` (None for inputs without texts behind them)."""
    if isinstance(encoded, TokenIds):
        return encoded.offsets[rows + 1] - encoded.offsets[rows]
    if isinstance(encoded, PooledFeatures):
        return encoded.lengths[rows]
    return None


def _tokenizer_fingerprint(tokenizer_path: str) -> str:
    digest = hashlib.sha256(str(Path(tokenizer_path).resolve()).encode())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        file = Path(tokenizer_path) / name
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=8)
def model_fingerprint(model_path: str) -> str:
    """The model folder's path, config and weight files (their bytes), hashed."""
    digest = hashlib.sha256(str(Path(model_path).resolve()).encode())
    folder = Path(model_path)
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors"),
                        *folder.glob("*.bin")]):
        if file.is_file():
            with file.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


@contextmanager
def _exclusive(file: Path):
    """Hold an exclusive lock beside ``file`` (one process computes, the others wait)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_pooled_features(data: LabelledData, tokens: TokenIds, model_path: str,
                           max_length: int, pooling: str,
                           compute: Callable[[], np.ndarray]) -> PooledFeatures:
    """The pooled encoder output of every text of ``data``: read from the cache, or
    ``compute()``d (float32, one row per text) and stored, keyed by the model's files, the
    data, ``max_length`` and ``pooling``."""
    key = _cache_key(data, "pooled-v1", model_fingerprint(model_path), str(max_length), pooling)
    file = cache_dir() / "features" / f"{data.name}-{key}.npy"
    lengths = tokens.offsets[1:] - tokens.offsets[:-1]
    with _exclusive(file):
        if not file.is_file():
            values = np.ascontiguousarray(compute(), dtype=np.float32)
            if values.shape[0] != len(data):
                raise ValueError(f"{values.shape[0]} pooled rows for {len(data)} texts")
            partial = file.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(partial, values)
            partial.replace(file)
    return PooledFeatures(np.load(file), lengths)


@lru_cache(maxsize=4)
def tokenize(data: LabelledData, tokenizer_path: str, max_length: int) -> TokenIds:
    """Token ids of every text, truncated to max_length, cached on disk."""
    key = _cache_key(data, _tokenizer_fingerprint(tokenizer_path), str(max_length))
    file = cache_dir() / "tokens" / f"{data.name}-{key}.npz"
    if file.is_file():
        stored = np.load(file)
        return TokenIds(stored["ids"], stored["offsets"], int(stored["pad_id"]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    encoded = tokenizer(list(data.texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(offsets[-1]))
    result = TokenIds(ids, offsets, int(tokenizer.pad_token_id or 0))
    _save(file, ids=ids, offsets=offsets, pad_id=result.pad_id)
    return result


def _cache_key(data: LabelledData, *settings: str) -> str:
    """A key for an encoding of ``data``: its name, size and texts, and the settings."""
    texts = hashlib.sha256("\x00".join(data.texts).encode()).hexdigest()
    return hashlib.sha256("\x00".join([data.name, str(len(data)), *settings, texts])
                          .encode()).hexdigest()[:24]


def _save(file: Path, **arrays: np.ndarray | int) -> None:
    """``np.savez`` to a temporary name, then renamed: concurrent workers never read half a
    file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, **arrays)
    partial.replace(file)


HASHING_VERSION = "unigram+bigram,l2,v1"  # change when the vectorizer's settings change


@lru_cache(maxsize=4)
def hash_bag_of_words(data: LabelledData, num_features: int) -> SparseFeatures:
    """L2-normalised hashed unigram+bigram counts (scikit-learn HashingVectorizer), cached on
    disk like the token ids: every Ray actor and every later run loads them instead of hashing
    the texts again."""
    file = cache_dir() / "hashed" / (f"{data.name}-"
                                     f"{_cache_key(data, str(num_features), HASHING_VERSION)}.npz")
    if file.is_file():
        stored = np.load(file)
        shape = (int(stored["rows"]), num_features)
        return SparseFeatures(sp.csr_matrix((stored["data"], stored["indices"],
                                             stored["indptr"]), shape=shape))
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=num_features, ngram_range=(1, 2),
                                   alternate_sign=False, norm="l2", dtype=np.float32)
    matrix = vectorizer.transform(data.texts).tocsr()
    matrix.sum_duplicates()  # canonical rows: SparseFeatures.pad reads them directly
    _save(file, data=matrix.data, indices=matrix.indices, indptr=matrix.indptr,
          rows=matrix.shape[0])
    return SparseFeatures(matrix)


def input_dim(encoded: Encoded) -> int:
    if isinstance(encoded, TokenIds):
        raise ValueError("token ids have no fixed input dimension")
    return int(encoded.values.shape[1])
