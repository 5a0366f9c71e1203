"""The passes over a chunk of clients' stacked updates, compiled: their norms and their sum,
and the addition of one kept row to an asynchronous buffer's sum.

Clients trained together (``fedtune.client.vectorised``) reply as rows of stacked arrays
(tensor name -> the clients' values, client k in row k). The cohort screens a chunk by every
update's norm ``‖w_k - w‖`` (``fedtune.server.guard``'s absurd-update bound) and adds the
accepted updates to the block's float64 sum ``Σ_k n_k w_k`` (``fedtune.server.summing``). A
chunk's stacked weights (16 MB for the engine benchmark's MLP) have left the caches once the
optimizer's step over the stack is done, so each pass is a read from memory: NumPy and torch
made three of them (the float32 differences written and read back for the norms, then
``einsum``'s float64 contraction), 0.068 CPU-ms a client at 1,000 clients. One compiled loop
over each row reads it once and does both, 0.022 (BENCHMARKS.md, "Clients trained together").

Hand-written because no library fuses a row's distance to a vector with a weighted row sum;
numba (the LLVM JIT NumPy's own projects use for such loops) compiles it, caches the machine
code beside this file, and costs ~0.3 s to import and ~0.3-0.6 s to load or compile once per
process, which is why only the chunk path (``fedtune.engine.cohort``) imports this module.

The sum's bits are ``einsum("k,k...->...", weights, rows, dtype=float64)``'s: each element
is ``Σ_k weights[k] × rows[k]`` in float64, k ascending from zero, then added to the total
(an integer weight up to 2**29 times a float32 is exact in float64, so no fused multiply-add
can round it differently); tests/server/test_chunk_passes.py checks the bits. The norms are
estimates: each difference exact in float64, the squares added in float64 in any order
(``fastmath`` reassociation lets LLVM vectorise the reduction), within ~1e-15 relative of
``guard.update_norm`` where a float32 estimate was within ~1e-6; a row whose estimate is not
finite or reaches the bound it is compared with is measured exactly by ``update_norm``, so a
bound decides, and its reason reads, as with ``update_norm``.

FedBuff (``strategies.fedbuff``) cannot sum a chunk while it is in cache: it keeps each update
until the event loop hears it and sums the updates from one start model in arrival order -
rows of several chunks' stacked copies, interleaved, read back from memory
(``fedtune.server.kept_row_sums``). ``add_weighted`` with weight 1 adds one row to a float64
total, one addition per element (``strategies.asynchronous.add_in_order``'s bits), where
NumPy's casting addition reads a row at half the speed (BENCHMARKS.md, the virtual clock); the
chunk kept for it is the trained stack itself, which the trainer hands over
(``fedtune.client.vectorised.StackedCopies``), so only its norms are read here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numba
import numpy as np

from fedtune.server.guard import NORM_ESTIMATE, update_norm


@numba.njit(fastmath={"reassoc", "nsz"}, nogil=True, cache=True)
def _squared_distance(row: np.ndarray, flat: np.ndarray) -> float:
    """Σ_j (row[j] - flat[j])², each difference and square in float64, summed in any order."""
    total = 0.0
    for j in range(row.size):
        difference = np.float64(row[j]) - np.float64(flat[j])
        total += difference * difference
    return total


@numba.njit(nogil=True, cache=True)
def add_weighted(total: np.ndarray, weight: float, row: np.ndarray) -> None:
    """total[j] += weight × row[j] in float64, element by element (no reassociation);
    ``total``: a flat float64 array, ``row`` as long (the loop checks no bound). With weight 1
    (exact in float64) the bits of ``strategies.asynchronous.add_in_order``'s addition."""
    for j in range(row.size):
        total[j] += weight * np.float64(row[j])


@numba.njit(nogil=True, cache=True)
def _distances_and_sum(rows: np.ndarray, flat: np.ndarray, weights: np.ndarray,
                       squares: np.ndarray, total: np.ndarray) -> None:
    """squares[k] += row k's squared distance to ``flat``, and ``total`` += Σ_k weights[k] ×
    row k, one read of each row while it is in cache."""
    for k in range(rows.shape[0]):
        row = rows[k]
        squares[k] += _squared_distance(row, flat)
        add_weighted(total, weights[k], row)


@numba.njit(nogil=True, cache=True)
def _distances(rows: np.ndarray, flat: np.ndarray, squares: np.ndarray) -> None:
    """squares[k] += row k's squared distance to ``flat``."""
    for k in range(rows.shape[0]):
        squares[k] += _squared_distance(rows[k], flat)


@numba.njit(nogil=True, cache=True)
def _sum(rows: np.ndarray, weights: np.ndarray, total: np.ndarray) -> None:
    """``total`` += Σ_k weights[k] × row k."""
    for k in range(rows.shape[0]):
        add_weighted(total, weights[k], rows[k])


def stacked_rows(value: np.ndarray) -> np.ndarray:
    """A stacked tensor as (clients, its values), C-contiguous and read-only, as the compiled
    loops take it."""
    return _read_only(np.ascontiguousarray(value.reshape(len(value), -1)))


def update_norms(global_arrays: Mapping[str, np.ndarray], stacked: Mapping[str, np.ndarray],
                 exact_from: float = math.inf) -> np.ndarray:
    """``guard.update_norm`` of every row of ``stacked``, estimated in one pass per tensor
    (the module doc), exact where the estimate is not finite or reaches ``exact_from`` ×
    (1 - ``NORM_ESTIMATE``)."""
    squares = np.zeros(_clients(stacked))
    for name, value in global_arrays.items():
        if value.dtype.kind == "f":
            _distances(_rows(stacked[name], value), _flat(value), squares)
    return _exact_near(np.sqrt(squares), global_arrays, stacked, exact_from)


def update_norms_and_sum(global_arrays: Mapping[str, np.ndarray],
                         stacked: Mapping[str, np.ndarray], weights: np.ndarray,
                         exact_from: float = math.inf
                         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``update_norms`` and ``Σ_k weights[k] × stacked[name][k]`` in float64 for every tensor
    of ``stacked``, from one read of each row."""
    squares = np.zeros(_clients(stacked))
    weights = _weights(weights, len(squares))
    sums = {}
    for name, value in stacked.items():
        total = np.zeros(value.shape[1:], np.float64)
        start = global_arrays[name]
        if start.dtype.kind == "f":
            _distances_and_sum(_rows(value, start), _flat(start), weights, squares,
                               total.ravel())
        else:
            _sum(_rows(value, start), weights, total.ravel())
        sums[name] = total
    return _exact_near(np.sqrt(squares), global_arrays, stacked, exact_from), sums


def accumulate_rows(total: dict[str, np.ndarray], stacked: Mapping[str, np.ndarray],
                    weights: np.ndarray) -> None:
    """``total += Σ_k weights[k] × stacked[name][k]`` in float64 for every tensor: a chunk of
    clients' updates added with the bits ``update_norms_and_sum`` gives them (the module
    doc); they differ from adding the rows one by one (``summing.accumulate``) in the order
    of the float64 additions only."""
    weights = _weights(weights, _clients(stacked))
    for name, value in stacked.items():
        chunk = np.zeros(value.shape[1:], np.float64)
        _sum(_rows(value, chunk), weights, chunk.ravel())
        total[name] += chunk


def _clients(stacked: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(stacked.values())))


def _weights(weights: np.ndarray, clients: int) -> np.ndarray:
    """One float64 weight per client, contiguous."""
    if len(weights) != clients:
        raise ValueError(f"{len(weights)} weights for {clients} clients")
    return _read_only(np.ascontiguousarray(weights, dtype=np.float64))


def _rows(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``stacked_rows`` (a view where it can be), each row as long as ``like`` (the compiled
    loops do not check their bounds); read-only (``_flat``)."""
    rows = stacked_rows(value)
    if rows.shape[1] != like.size:
        raise ValueError(f"rows of {rows.shape[1]} values against a tensor of {like.size}")
    return rows


def _flat(value: np.ndarray) -> np.ndarray:
    """A global tensor's values, C-contiguous and read-only: numba compiles a loop once per
    array type and a read-only array is another type, so the same inputs are always read-only
    (the global model is writable in the first round and read-only after it: a second
    compilation, or ~0.2 s to load it from the cache, in the second round)."""
    return _read_only(np.ascontiguousarray(value).ravel())


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _exact_near(estimates: np.ndarray, global_arrays: Mapping[str, np.ndarray],
                stacked: Mapping[str, np.ndarray], exact_from: float) -> np.ndarray:
    """``estimates``, with each row that is not finite or reaches ``exact_from`` × (1 -
    ``NORM_ESTIMATE``) measured by ``update_norm``."""
    exact = ~np.isfinite(estimates) | (estimates >= exact_from * (1 - NORM_ESTIMATE))
    for k in np.flatnonzero(exact):
        estimates[k] = update_norm(global_arrays, {name: value[k]
                                                   for name, value in stacked.items()})
    return estimates
