"""A block's round seeds derived at once are SeedSequence's."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.parametrize("dispatch", [0, 1, 17, 2**32 - 1, 2**32, 2**40])
@pytest.mark.parametrize("run_seed,server_round", [(0, 1), (42, 3), (2**32 + 3, 2)])
def test_an_asynchronous_calls_seeds_are_each_clients_own(run_seed, server_round, dispatch):
    """A training call's dispatch is a fourth entropy word (computed at once where the pool
    holds it, one by one past it): the seeds are SeedSequence's either way."""
    ids = [0, 1, 2, 999, 65_537, 2**32 - 1, 2**32]
    assert client_round_seeds(run_seed, server_round, ids, dispatch) == [
        client_round_seed(run_seed, server_round, i, dispatch) for i in ids]
    assert client_round_seeds(run_seed, server_round, ids, dispatch) != client_round_seeds(
        run_seed, server_round, ids, dispatch + 1)
