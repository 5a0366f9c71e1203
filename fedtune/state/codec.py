"""A client's state (a Flower ``RecordDict``) as bytes: Flower's own protobuf, no pickle, so
reading state runs no code. The same bytes travel to Ray actors, name the state's file on disk
(``fedtune.state.blobs``) and fill checkpoints."""

from __future__ import annotations

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict


def state_to_bytes(state: RecordDict) -> bytes:
    """A client's state as Flower's protobuf (an empty state is ``b""``)."""
    return recorddict_to_proto(state).SerializeToString()


def state_from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)
