"""A client's trained model held as a row of a cohort's stacked arrays.

Clients trained together (``fedtune.client.vectorised``) come back as stacked arrays (tensor
name -> every client's values, client k in row k), which the cohort keeps as the trainer hands
them over (``fedtune.engine.cohort``), each accepted client's update a ``StackedRow`` of it: a
read-only mapping like any model, whose stack and row let the asynchronous loop keep the stack
as it is (``fedtune.server.async_loop``) and a compiled sum read the rows in place
(``fedtune.server.kept_row_sums``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


class StackedRow(Mapping[str, np.ndarray]):
    """The model in row ``row`` of ``stack`` (tensor name -> stacked values), read without a
    copy."""

    __slots__ = ("row", "stack")

    def __init__(self, stack: Mapping[str, np.ndarray], row: int) -> None:
        self.stack, self.row = stack, row

    def __getitem__(self, name: str) -> np.ndarray:
        return self.stack[name][self.row]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stack)

    def __len__(self) -> int:
        return len(self.stack)
