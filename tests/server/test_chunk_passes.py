"""The compiled passes over a chunk's stacked updates: each norm is ``update_norm``'s, exactly
so near a bound, and the chunk's sum has ``einsum``'s float64 bits."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.server.chunk_passes import (
    accumulate_rows,
    update_norms,
    update_norms_and_sum,
)
from fedtune.server.guard import update_norm
from fedtune.server.summing import accumulate


def _chunk(dtype: type = np.float32, clients: int = 40, seed: int = 3
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    global_arrays = {"w": rng.normal(size=(64, 700)).astype(dtype),
                     "b": rng.normal(size=64).astype(dtype),
                     "scale": np.array(0.5, dtype),  # a 0-d tensor
                     "steps": np.arange(4)}  # not floating: no part of a norm
    stacked = {name: (value + rng.normal(0, 0.1, (clients, *value.shape))).astype(value.dtype)
               for name, value in global_arrays.items()}
    return global_arrays, stacked


def _einsum_sum(stacked: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """The sum as NumPy's ``einsum`` contracts it (the bits the engine's sums had before)."""
    return {name: np.zeros(value.shape[1:]) + np.einsum("k,k...->...", weights, value,
                                                         dtype=np.float64)
            for name, value in stacked.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_are_update_norms_and_exact_near_the_bound(dtype):
    global_arrays, stacked = _chunk(dtype)
    stacked["w"][7, 3, 5] = np.nan
    stacked["b"][9] = 3e38 if dtype is np.float32 else 1e300  # its square overflows float32
    stacked["w"][11] *= 1e3  # beyond the bound below
    exact = [update_norm(global_arrays, {name: value[k] for name, value in stacked.items()})
             for k in range(40)]
    bound = 1e3
    assert exact[11] > bound > max(v for k, v in enumerate(exact) if k not in (7, 9, 11))
    weights = np.arange(1, 41, dtype=np.float64)
    for norms in (update_norms(global_arrays, stacked, exact_from=bound),
                  update_norms_and_sum(global_arrays, stacked, weights, exact_from=bound)[0]):
        assert np.isnan(norms[7])
        assert norms[11] == exact[11]  # measured exactly: the bound decides as update_norm's
        for k in set(range(40)) - {7, 11}:
            assert norms[k] == pytest.approx(exact[k], rel=1e-12)


def test_the_chunks_sum_has_einsums_bits_and_is_the_loops_sum():
    global_arrays, stacked = _chunk(clients=37)
    weights = np.random.default_rng(5).integers(1, 5000, 37).astype(np.float64)
    reference = _einsum_sum(stacked, weights)
    _, sums = update_norms_and_sum(global_arrays, stacked, weights)
    total = {name: np.zeros(value.shape) for name, value in global_arrays.items()}
    accumulate_rows(total, stacked, weights)
    loop = {name: np.zeros(value.shape) for name, value in global_arrays.items()}
    for k in range(37):
        accumulate(loop, {name: value[k] for name, value in stacked.items()}, float(weights[k]))
    for name in global_arrays:
        assert sums[name].dtype == np.float64 and sums[name].shape == global_arrays[name].shape
        np.testing.assert_array_equal(sums[name], reference[name])
        np.testing.assert_array_equal(total[name], reference[name])
        np.testing.assert_allclose(sums[name], loop[name], rtol=1e-13, atol=1e-12)


def test_rows_that_do_not_fit_are_refused():
    global_arrays, stacked = _chunk(clients=4)
    with pytest.raises(ValueError, match="rows of 64 values against a tensor of 63"):
        update_norms({"b": global_arrays["b"][:63]}, {"b": stacked["b"]})
    with pytest.raises(ValueError, match="3 weights for 4 clients"):
        update_norms_and_sum(global_arrays, stacked, np.ones(3))
