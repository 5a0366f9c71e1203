"""NumPy views of Flower records, the reply checks and the update-reading base class shared by
the strategies of this package.

Flower's own ``validate_message_reply_consistency`` insists on exactly one ArrayRecord per
reply; SCAFFOLD replies carry two (model and control-variate delta), so the strategies here
check replies against the global model they sent instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

NDArray = np.ndarray


def to_numpy(record: ArrayRecord) -> dict[str, NDArray]:
    """The arrays of a record by name."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Mapping[str, NDArray], like: Mapping[str, NDArray]) -> ArrayRecord:
    """An ArrayRecord of ``arrays`` cast to the dtypes of ``like`` (float64 maths stays inside)."""
    return ArrayRecord({name: Array(np.asarray(value, dtype=like[name].dtype))
                        for name, value in arrays.items()})


def floating(arrays: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """Only the floating-point arrays (integer buffers take no gradient steps)."""
    return {name: value for name, value in arrays.items() if np.issubdtype(value.dtype, np.floating)}


def zeros_like(arrays: Mapping[str, NDArray]) -> dict[str, NDArray]:
    return {name: np.zeros_like(value) for name, value in arrays.items()}


def metric(content: RecordDict, key: str) -> float:
    """A value of the (single) MetricRecord of a reply."""
    record: MetricRecord = next(iter(content.metric_records.values()))
    return float(record[key])  # type: ignore[arg-type]


def require_configured(arrays: dict[str, NDArray] | None, strategy: str) -> dict[str, NDArray]:
    """State that ``configure_train`` sets (global model, control variate) before aggregation."""
    if arrays is None:
        raise AggregationError(reason=f"{strategy}: aggregate_train was called before "
                                      "configure_train, so the global model is unknown")
    return arrays


def check_replies(contents: Iterable[RecordDict], expected: Mapping[str, Mapping[str, NDArray]],
                  metric_keys: Iterable[str]) -> None:
    """Each reply holds every expected ArrayRecord with the same names and shapes, one
    MetricRecord, and every metric named; raise ``InconsistentMessageReplies`` otherwise."""
    metric_keys = list(metric_keys)
    for content in contents:
        for record_key, reference in expected.items():
            record = content.array_records.get(record_key)
            if record is None:
                raise InconsistentMessageReplies(reason=f"a reply has no ArrayRecord "
                                                        f"'{record_key}'")
            if set(record) != set(reference):
                raise InconsistentMessageReplies(reason=f"ArrayRecord '{record_key}' of a reply "
                                                        "has other array names than expected")
            for name, array in record.items():
                if tuple(array.shape) != reference[name].shape:
                    raise InconsistentMessageReplies(
                        reason=f"'{record_key}/{name}' has shape {tuple(array.shape)}, "
                               f"expected {reference[name].shape}")
        if len(content.metric_records) != 1:
            raise InconsistentMessageReplies(reason="expected exactly one MetricRecord per reply")
        record = next(iter(content.metric_records.values()))
        missing = [key for key in metric_keys if key not in record]
        if missing:
            raise InconsistentMessageReplies(reason=f"a reply's metrics lack {missing}")


def flatten(arrays: Mapping[str, NDArray], names: list[str]) -> NDArray:
    """The arrays named ``names``, in that order, as one float64 vector."""
    return np.concatenate([np.asarray(arrays[name], np.float64).ravel() for name in names])


def add_flat_step(x: Mapping[str, NDArray], names: list[str], step: NDArray
                  ) -> dict[str, NDArray]:
    """``x`` with the flat vector ``step`` (laid out as ``flatten(x, names)``) added to the
    arrays named ``names``; the other arrays as they are."""
    new, start = dict(x), 0
    for name in names:
        size = x[name].size
        new[name] = x[name] + step[start:start + size].reshape(x[name].shape)
        start += size
    return new


class UpdatesFromGlobal(FedAvg):
    """A FedAvg whose aggregation reads each reply as an update from the global model it sent:
    ``configure_train`` keeps that model, ``new_arrays`` gets it with the valid replies and
    their float64 updates ``w_i - x`` of the floating arrays (the robust rules of this package
    that start from the updates: centred clipping, FLTrust, FLAME, norm bounding)."""

    label = "this strategy"  # named in the error when aggregation comes before configuration

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.global_arrays: dict[str, NDArray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The valid replies' float64 updates ``w_i - x`` go to ``new_arrays``; nothing when
        no reply is valid."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        x = require_configured(self.global_arrays, self.label)
        moving = floating(x)
        contents = [message.content for message in valid]
        updates = [{name: to_numpy(c[self.arrayrecord_key])[name].astype(np.float64) - value
                    for name, value in moving.items()} for c in contents]
        new = self.new_arrays(server_round, x, contents, updates)
        return to_record(new, x), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def new_arrays(self, server_round: int, x: dict[str, NDArray], contents: list[RecordDict],
                   updates: list[dict[str, NDArray]]) -> dict[str, NDArray]:
        """The next global model from the global one ``x`` and the replies' updates."""
        raise NotImplementedError
