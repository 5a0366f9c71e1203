"""Encodings and batches: cached hashed features, sparse rows, DataLoader's order without it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from fedtune.data.encode import SparseFeatures, hash_bag_of_words
from fedtune.data.loaders import (
    RowBatches,
    RowDataset,
    ShuffledRows,
    eval_loader,
    first_epoch_batches,
    train_loader,
    train_rows,
)
from fedtune.data.sources import load_dataset
from fedtune.train import TrainSettings, local_batches


def test_hashed_features_are_cached_on_disk_and_equal_to_fresh_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    data = load_dataset("rotten_tomatoes")
    hash_bag_of_words.cache_clear()
    fresh = hash_bag_of_words(data, 64)
    files = list((tmp_path / "hashed").glob("rotten_tomatoes-*.npz"))
    assert len(files) == 1
    hash_bag_of_words.cache_clear()
    cached = hash_bag_of_words(data, 64)
    assert cached.values.shape == fresh.values.shape == (len(data), 64)
    assert (cached.values != fresh.values).nnz == 0
    hash_bag_of_words.cache_clear()
    assert hash_bag_of_words(data, 32).values.shape[1] == 32  # another key, another file
    assert len(list((tmp_path / "hashed").glob("*.npz"))) == 2
    hash_bag_of_words.cache_clear()


@pytest.mark.parametrize("rows", [[3, 7, 7, 0], [49], [], list(range(50))])
def test_sparse_rows_are_gathered_as_scipy_would(rows):
    matrix = sp.random(50, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    padded = SparseFeatures(matrix).pad(np.array(rows, dtype=np.int64))["features"].numpy()
    np.testing.assert_array_equal(padded, matrix[rows].toarray())


@pytest.mark.parametrize("size, batch, steps", [(11, 8, 1), (11, 8, 5), (3, 8, 4), (16, 4, 9)])
def test_shuffled_batches_are_dataloaders_batches(size, batch, steps):
    """The same batches, in the same order, as a seeded DataLoader - across epochs and with
    local steps that stop in the middle of one (the generator is drawn from identically)."""
    features = np.arange(size * 3, dtype=np.float32).reshape(size, 3)
    labels = np.arange(size) % 2
    rows = np.arange(size)[::-1].copy()
    from fedtune.data.encode import DenseFeatures

    dataset = RowDataset(DenseFeatures(features), labels, rows)
    settings = TrainSettings(local_steps=steps)
    ours = RowBatches(dataset, ShuffledRows(dataset.rows, min(batch, size),
                                            torch.Generator().manual_seed(7)))
    theirs = DataLoader(dataset, batch_size=min(batch, size), shuffle=True,
                        generator=torch.Generator().manual_seed(7), collate_fn=dataset.collate)
    assert len(ours) == len(theirs)
    for _ in range(2):  # the same loader object used twice: the generators stay in step
        mine, reference = list(local_batches(ours, settings)), list(local_batches(theirs, settings))
        assert len(mine) == len(reference) == steps
        for (a, y_a), (b, y_b) in zip(mine, reference, strict=True):
            assert torch.equal(a["features"], b["features"]) and torch.equal(y_a, y_b)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_first_epoch_batches_are_each_clients_loader_batches(steps):
    """A chunk's first-epoch batches from one generator seeded again per client: the rows each
    client's own loader (``train_rows`` + ``local_batches``) gives, in order, with its batches
    per epoch; None where a client's steps run past its first epoch, or for texts."""
    from fedtune.data.encode import DenseFeatures, TokenIds

    encoded = DenseFeatures(np.zeros((40, 2), np.float32))
    rng = np.random.default_rng(3)
    sizes = (11, 9, 5, 17, 6, *([3] if steps == 1 else []))  # 3 rows: one batch of 3
    rows = [np.sort(rng.choice(40, size, replace=False)) for size in sizes]
    seeds = [int(seed) for seed in rng.integers(0, 2**63, len(rows))]
    got = first_epoch_batches(encoded, rows, 4, seeds, steps)
    if steps == 3:  # the clients of 5 and 6 rows have two batches an epoch
        assert got is None
        return
    batches, per_epoch = got
    for client_rows, seed, mine, epoch in zip(rows, seeds, batches, per_epoch, strict=True):
        loader = train_rows(encoded, client_rows, 4, seed)
        theirs = list(local_batches(loader, TrainSettings(local_steps=steps)))
        assert epoch == len(loader) and len(mine) == len(theirs) == steps
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    tokens = TokenIds(np.arange(80, dtype=np.int32), np.arange(0, 81, 2), 0)
    assert first_epoch_batches(tokens, rows, 4, seeds, 1) is None
    assert first_epoch_batches(encoded, [*rows, np.arange(0)], 4, [*seeds, 1], 1) is None


def test_train_loader_uses_shuffled_batches_for_features_only():
    from fedtune.data.encode import DenseFeatures, TokenIds

    labels = np.zeros(4, dtype=np.int64)
    dense = train_loader(DenseFeatures(np.zeros((4, 2), np.float32)), labels, np.arange(4), 2, 0)
    tokens = TokenIds(np.arange(8, dtype=np.int32), np.array([0, 2, 4, 6, 8]), 0)
    assert isinstance(dense, RowBatches)
    assert isinstance(train_loader(tokens, labels, np.arange(4), 2, 0), DataLoader)


@pytest.mark.parametrize("size, batch", [(11, 4), (3, 8), (0, 4), (16, 16)])
@pytest.mark.parametrize("text", [False, True])
def test_evaluation_batches_are_dataloaders_batches_and_draw_its_base_seed(size, batch, text):
    """``eval_loader``'s batches equal an unshuffled DataLoader's over the same (length-sorted)
    rows, and iterating it leaves torch's default generator where DataLoader leaves it."""
    from fedtune.data.encode import DenseFeatures, TokenIds

    rng = np.random.default_rng(size)
    lengths = rng.integers(1, 6, size=20)
    encoded = (TokenIds(np.arange(lengths.sum(), dtype=np.int32),
                        np.concatenate([[0], np.cumsum(lengths)]), 0) if text
               else DenseFeatures(rng.normal(size=(20, 3)).astype(np.float32)))
    labels = np.arange(20) % 3
    rows = rng.permutation(20)[:size]
    ours = eval_loader(encoded, labels, rows, batch)
    ordered = rows[np.argsort(lengths[rows], kind="stable")] if text else rows
    dataset = RowDataset(encoded, labels, ordered)
    theirs = DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=dataset.collate)
    assert len(ours) == len(theirs)
    torch.manual_seed(5)
    mine = list(ours)
    after_ours = torch.rand(3)
    torch.manual_seed(5)
    reference = list(theirs)
    assert torch.equal(after_ours, torch.rand(3))
    assert len(mine) == len(reference)
    for (a, y_a), (b, y_b) in zip(mine, reference, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(y_a, y_b)
