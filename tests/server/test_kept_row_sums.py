"""FedBuff's ordered sum of kept rows (``KeptRowSum``) has the bits of adding the models one by
one in arrival order, whatever they are (rows of float32 stacks, of float64 ones, plain
models)."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.server.kept_row_sums import KeptRowSum
from fedtune.server.stacked_rows import StackedRow
from strategies.asynchronous import sums_in_order


def _stack(rows: int, seed: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    stack = {"w": rng.normal(0, 3, (rows, 16, 70)).astype(dtype),
             "b": rng.normal(0, 1e-3, (rows, 16)).astype(dtype),
             "scale": rng.normal(size=rows).astype(dtype)}  # a 0-d tensor per client
    for value in stack.values():
        value.flags.writeable = False
    return stack


def _summed(models: list) -> dict[str, np.ndarray]:
    total = KeptRowSum(["w", "b", "scale"])
    for model in models:
        total.add(model)
    return total.result()


def _assert_bits(models: list) -> None:
    summed, reference = _summed(models), sums_in_order(models, ["w", "b", "scale"])
    assert list(summed) == ["w", "b", "scale"]
    for name, value in reference.items():
        assert summed[name].dtype == np.float64 and summed[name].shape == value.shape
        np.testing.assert_array_equal(summed[name], value)


def test_rows_of_several_stacks_interleaved():
    """Rows of four chunks' stacks in a random arrival order (a row heard twice counts twice)."""
    stacks = [_stack(rows, seed) for rows, seed in ((64, 1), (64, 2), (40, 3), (17, 4))]
    rng = np.random.default_rng(0)
    picks = rng.integers(4, size=197)
    _assert_bits([StackedRow(stacks[s], int(rng.integers(len(stacks[s]["w"])))) for s in picks])


@pytest.mark.parametrize("odd", ["plain", "float64", "other shape"])
def test_a_model_the_compiled_loop_cannot_read_is_added_in_its_place(odd):
    """A plain model, a row of a float64 stack or of a stack of other shapes (no model the
    engines make, but an input all the same) arrives mid-stream: it and every model after it
    are added at ``result``, after the rows before it, in arrival order."""
    stack, rng = _stack(64, 5), np.random.default_rng(1)
    if odd == "plain":
        other = {name: value[3].copy() for name, value in _stack(8, 6).items()}
    elif odd == "float64":
        other = StackedRow(_stack(8, 6, np.float64), 2)
    else:
        wide = _stack(8, 6)
        other = StackedRow({**wide, "w": np.zeros((8, 16, 71), np.float32)}, 2)
    models = [StackedRow(stack, int(rng.integers(64))) for _ in range(67)]
    models += [other] + [StackedRow(stack, int(rng.integers(64))) for _ in range(10)]
    if odd == "other shape":  # its "w" cannot join the others': the sum says so
        with pytest.raises(ValueError, match="broadcast"):
            _summed(models)
        return
    _assert_bits(models)


def test_a_sum_of_plain_models_only():
    models = [{name: value[k] for name, value in _stack(5, 7).items()} for k in range(5)]
    _assert_bits(models)
