"""A block's round seeds derived at once are SeedSequence's, and shuffled rows are
DataLoader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedtune.data.loaders import ShuffledRows
from fedtune.task import client_round_seed, client_round_seeds


@pytest.mark.parametrize("run_seed", [0, 7, 2**32 - 1, 2**32 + 3, 2**63])
@pytest.mark.parametrize("server_round", [0, 1, 250, 2**40])
def test_a_blocks_seeds_are_each_clients_own(run_seed, server_round):
    ids = [0, 1, 2, 31, 32, 999, 65_537, 1_000_000, 2**32 - 1, 2**32]  # the last: one by one
    assert client_round_seeds(run_seed, server_round, ids) == [
        client_round_seed(run_seed, server_round, i) for i in ids]


def test_a_blocks_seeds_for_a_whole_cohort():
    ids = np.arange(0, 5000, 3)
    assert client_round_seeds(42, 3, ids) == [client_round_seed(42, 3, int(i)) for i in ids]


def test_shuffled_rows_are_dataloaders_batches_epoch_after_epoch():
    rows = np.arange(100, 137)  # 37 rows in batches of 8: a smaller last batch
    ours = ShuffledRows(rows, 8, torch.Generator().manual_seed(11))
    theirs = DataLoader(rows.tolist(), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(11))
    for _ in range(3):
        assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]
