"""One ArrayRecord of a client's state read and replaced in the state's bytes, without building
a Flower ``RecordDict``: what clients trained together (``fedtune.client.vectorised``) keep of
themselves each round (FedPer's head) costs a protobuf parse and a serialisation per client,
not a Flower ``Array`` per tensor (``np.save`` to make one, a ``.npy`` header parsed to read
one: the most of a FedPer round's per-client cost, measured in BENCHMARKS.md).

The bytes are exactly ``fedtune.state.codec.state_to_bytes`` of the state with that record
replaced by ``ArrayRecord({name: Array(value)})`` (what ``fedtune.personal.base.store_arrays``
keeps), so the store, its digests on disk, checkpoints and the runtimes that keep a
``RecordDict`` (``Context.state``) see the same states whichever path wrote them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.common.constant import SType
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtune.protocol import npy_view

# (dtype, shape, fortran order) -> the .npy header np.save writes for it, and the dtype's name
# (str(dtype) takes longer than the rest of an array's encoding)
_HEADERS: dict[tuple[np.dtype, tuple[int, ...], bool], tuple[bytes, str]] = {}
# a .npy header -> (dtype, shape, order, count of values), checked once by npy_view
_READ: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}
_LENGTH_AT = {1: slice(8, 10), 2: slice(8, 12)}  # .npy major version -> header length bytes


def npy_bytes(value: np.ndarray) -> tuple[bytes, str]:
    """What ``np.save(..., allow_pickle=False)`` writes for ``value`` (a Flower ``Array``'s
    data), its header made once per dtype, shape and order; and ``str(value.dtype)``."""
    fortran = value.flags.f_contiguous and not value.flags.c_contiguous
    key = (value.dtype, value.shape, fortran)
    known = _HEADERS.get(key)
    if known is None:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(value.shape, value.dtype, order="F" if fortran else "C"),
                allow_pickle=False)
        known = buffer.getvalue()[:len(buffer.getvalue()) - value.nbytes], str(value.dtype)
        _HEADERS[key] = known
    header, dtype = known
    return header + value.tobytes(order="F" if fortran else "C"), dtype


def _npy_values(data: bytes) -> np.ndarray:
    """``fedtune.protocol.npy_view`` of ``.npy`` bytes, its header parsed once per header."""
    length_at = _LENGTH_AT.get(data[6]) if len(data) > 6 else None
    if length_at is None:
        return npy_view(_Data(data))  # its error
    end = length_at.stop + int.from_bytes(data[length_at], "little")
    known = _READ.get(data[:end])
    if known is None:
        view = npy_view(_Data(data))
        fortran = view.flags.f_contiguous and not view.flags.c_contiguous
        _READ[data[:end]] = view.dtype, view.shape, "F" if fortran else "C", view.size
        return view
    dtype, shape, order, count = known
    if len(data) - end != count * dtype.itemsize:
        return npy_view(_Data(data))  # its error
    return np.frombuffer(data, dtype, count, end).reshape(shape, order=order)


class _Data:
    """The ``data`` of an Array, for ``npy_view``."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def read_arrays(state: bytes, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of record ``key`` of a state's bytes (read-only, in the order kept), or None
    when the state has no such record; ValueError when it is not an ArrayRecord."""
    if not state:
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(state)
    for item in proto.items:
        if item.key != key:
            continue
        if item.WhichOneof("value") != "array_record":
            raise ValueError(f"the client state's record {key!r} is not an ArrayRecord")
        return {entry.key: _npy_values(entry.value.data) for entry in item.array_record.items}
    return None


def with_arrays(state: bytes, key: str, arrays: Mapping[str, np.ndarray]) -> bytes:
    """A state's bytes with record ``key`` replaced by ``arrays`` (in their order; appended
    when the state has no such record), the rest as it was."""
    proto = ProtoRecordDict()
    if state:
        proto.ParseFromString(state)
    items = []
    for name, value in arrays.items():
        data, dtype = npy_bytes(value)
        items.append(ProtoArrayRecord.Item(key=name, value=ProtoArray(
            dtype=dtype, shape=value.shape, stype=SType.NUMPY, data=data)))
    record = ProtoArrayRecord(items=items)
    for item in proto.items:
        if item.key == key:
            item.array_record.CopyFrom(record)
            break
    else:
        proto.items.add(key=key, array_record=record)
    return proto.SerializeToString()
