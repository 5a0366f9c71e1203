"""One ArrayRecord of a client's state read and replaced in its bytes: the same bytes as the
RecordDict path (so digests, files and checkpoints agree), the same values, the same refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.personal.base import store_arrays
from fedtune.state.arrays import read_arrays, with_arrays
from fedtune.state.codec import state_from_bytes, state_to_bytes

KEY = "personal-model"
RNG = np.random.default_rng(7)
HEAD = {"fc.weight": RNG.standard_normal((2, 5)).astype(np.float32),
        "fc.bias": RNG.standard_normal(2).astype(np.float32)}


def _states() -> list[RecordDict]:
    """An empty state, one with other records only, one whose record ``KEY`` sits between
    others and holds other tensors."""
    return [RecordDict(),
            RecordDict({"mix": ConfigRecord({"alpha": 0.25}), "m": MetricRecord({"n": 3})}),
            RecordDict({"mix": ConfigRecord({"alpha": 0.25}),
                        KEY: ArrayRecord({"old": Array(np.zeros(3))}),
                        "variate": ArrayRecord({"c": Array(np.ones((2, 2)))})})]


@pytest.mark.parametrize("index", range(3))
def test_replacing_a_record_gives_the_bytes_of_the_recorddict_path(index):
    before = _states()[index]
    data = state_to_bytes(before)
    state = state_from_bytes(data) if data else RecordDict()
    store_arrays(state, KEY, HEAD)
    assert with_arrays(data, KEY, HEAD) == state_to_bytes(state)
    kept = read_arrays(with_arrays(data, KEY, HEAD), KEY)
    assert list(kept) == list(HEAD)
    for name, value in HEAD.items():
        np.testing.assert_array_equal(kept[name], value)
        assert kept[name].dtype == value.dtype and not kept[name].flags.writeable


@pytest.mark.parametrize("value", [
    np.asfortranarray(RNG.standard_normal((3, 4))),  # Fortran order
    np.ones((), np.float64),  # 0-d
    np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # neither order: written in C order
    np.zeros((0, 3), np.float16),  # empty
])
def test_any_array_is_written_as_np_save_writes_it_and_read_back(value):
    state = RecordDict()
    store_arrays(state, KEY, {"v": value})
    for _ in range(2):  # the second time from the cached headers
        data = with_arrays(b"", KEY, {"v": value})
        assert data == state_to_bytes(state)
        back = read_arrays(data, KEY)["v"]
        assert back.shape == value.shape and back.dtype == value.dtype
        np.testing.assert_array_equal(back, value)


def test_a_missing_record_is_none_and_another_kind_of_record_is_refused():
    assert read_arrays(b"", KEY) is None
    assert read_arrays(state_to_bytes(_states()[1]), KEY) is None
    with pytest.raises(ValueError, match="'mix' is not an ArrayRecord"):
        read_arrays(state_to_bytes(_states()[1]), "mix")


def test_values_that_do_not_fill_their_header_are_refused_even_after_a_good_read():
    good = with_arrays(b"", KEY, HEAD)
    read_arrays(good, KEY)  # its headers are known now
    data = Array(HEAD["fc.weight"]).data
    short = RecordDict({KEY: ArrayRecord({"w": Array(dtype="float32", shape=(2, 5),
                                                      stype="numpy.ndarray",
                                                      data=data[:-4])})})
    with pytest.raises(ValueError, match="36 bytes of values"):
        read_arrays(state_to_bytes(short), KEY)
    pickled = RecordDict({KEY: ArrayRecord({"w": Array(dtype="float32", shape=(2,),
                                                        stype="numpy.ndarray",
                                                        data=b"not a .npy file")})})
    with pytest.raises(ValueError):
        read_arrays(state_to_bytes(pickled), KEY)
