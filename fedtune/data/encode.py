"""Turn a dataset into model inputs once per process: token ids, hashed bag-of-words, or features.

Tokenization runs once per (dataset, tokenizer, max_length) and is cached in memory and on disk
(``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``), so simulated clients, Ray workers and repeated
runs reuse it. Texts are stored as ragged id arrays; batches are padded to their own longest
text (dynamic padding) when they are built.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
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
        return {"features": torch.from_numpy(self.values[rows].toarray())}


Encoded = TokenIds | DenseFeatures | SparseFeatures


def _tokenizer_fingerprint(tokenizer_path: str) -> str:
    digest = hashlib.sha256(str(Path(tokenizer_path).resolve()).encode())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        file = Path(tokenizer_path) / name
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=4)
def tokenize(data: LabelledData, tokenizer_path: str, max_length: int) -> TokenIds:
    """Token ids of every text, truncated to max_length, cached on disk."""
    key = hashlib.sha256(
        "\x00".join([data.name, str(len(data)), _tokenizer_fingerprint(tokenizer_path),
                     str(max_length), hashlib.sha256("\x00".join(data.texts).encode()).hexdigest()])
        .encode()
    ).hexdigest()[:24]
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
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, ids=ids, offsets=offsets, pad_id=result.pad_id)
    partial.replace(file)  # atomic: concurrent workers never read half a file
    return result


@lru_cache(maxsize=4)
def hash_bag_of_words(data: LabelledData, num_features: int) -> SparseFeatures:
    """L2-normalised hashed unigram+bigram counts of every text of ``data``."""
    return SparseFeatures(hashed_features(data.texts, num_features))


def hashed_features(texts: Sequence[str], num_features: int) -> sp.csr_matrix:
    """L2-normalised hashed unigram+bigram counts (scikit-learn HashingVectorizer): stateless,
    so new texts get the features the model was trained on."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=num_features, ngram_range=(1, 2),
                                   alternate_sign=False, norm="l2", dtype=np.float32)
    return vectorizer.transform(texts).tocsr()


def input_dim(encoded: Encoded) -> int:
    if isinstance(encoded, TokenIds):
        raise ValueError("token ids have no fixed input dimension")
    return int(encoded.values.shape[1])
