"""A client's trained model held as a row of a cohort's stacked arrays.

Clients trained together (``fedtune.client.vectorised``) come back as stacked arrays (tensor
name -> every client's values, client k in row k), which the cohort keeps as one copy per chunk
(``fedtune.engine.cohort``). The asynchronous event loop hands a heard client's model to its
strategy as a ``StackedRow``: a read-only mapping like any model, whose stack and row let a
compiled sum read the rows in place (``fedtune.server.chunk_passes.sums_in_order``).
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
