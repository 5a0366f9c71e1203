"""FedBuff's buffer summed as its updates arrive: each a row of a cohort's kept stack, compiled.

FedBuff (``strategies.fedbuff``) sums the trained models that started from one model in
arrival order, one float64 addition per model (``strategies.asynchronous.OrderedSum``). A
synchronous round sums each chunk of clients while it is in cache; FedBuff cannot - a client is
added when the server hears of it, long after its chunk trained - so every kept row is read
back from memory, ~0.03 CPU-ms per update of the engine benchmark's MLP (263 KB a row). The
event loop's ``KeptRowSum`` adds each heard row as it arrives, a tensor at a time, in a
compiled loop (``fedtune.server.chunk_passes.add_weighted``, the round's own, with weight 1:
NumPy's casting addition reads a row at half the speed), on the main thread between the
trainings. ``result`` gives the same bits as adding the models one by one in arrival order.

Until 2026-12-06 the rows were added 64 at a time, on a worker thread beside the training and
through numba typed Lists of the stacks. On two cores the thread competed with torch's own
threads (FedBuff K = 1,000 made 22 % more client updates per wall second on the main thread),
and numba compiled the typed List's methods in every process (~0.4-0.75 s, not cached), which a
row at a time does not need (BENCHMARKS.md, the virtual clock).

A model that is not a row of a cohort's kept float32 stack of the first such stack's shapes (a
Ray actor's reply, one trained alone) is added at ``result``, in order, after everything before
it; so is every model after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.server.chunk_passes import add_weighted, stacked_rows
from fedtune.server.stacked_rows import StackedRow
from strategies.asynchronous import NDArrays, OrderedSum, add_in_order


class KeptRowSum(OrderedSum):
    """An ``OrderedSum`` that adds each row of a kept float32 stack as it arrives."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)  # ``models``: the ones added at ``result``, in order
        self.shapes: list[tuple[int, ...]] = []  # each tensor's, from the first such stack
        # id(stack) -> the stack (alive while its id is a key) and its tensors as rows of
        # values (``stacked_rows``), or None where the compiled loop cannot read it
        self.stacks: dict[int, tuple[Mapping[str, np.ndarray], list[np.ndarray] | None]] = {}
        self.totals: list[np.ndarray] = []  # flat float64, one per name

    def add(self, model: Mapping[str, np.ndarray]) -> None:
        rows = None if self.models else self._rows(model)
        if rows is None:  # it, and all after it, at ``result``
            self.models.append(model)
            return
        row = model.row  # type: ignore[attr-defined]
        for total, values in zip(self.totals, rows, strict=True):
            add_weighted(total, 1.0, values[row])

    def result(self) -> NDArrays:
        if not self.totals:
            totals = {name: np.zeros(np.shape(self.models[0][name])) for name in self.names}
        else:
            totals = {name: total.reshape(shape) for name, total, shape
                      in zip(self.names, self.totals, self.shapes, strict=True)}
        add_in_order(totals, self.models)
        return totals

    def _rows(self, model: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """``model``'s stack as the compiled loop reads it, a tensor at a time, or None where
        ``model`` is no row of a stack of float32 tensors of the first such stack's shapes."""
        if not isinstance(model, StackedRow):
            return None
        known = self.stacks.get(id(model.stack))
        if known is None:
            known = self.stacks[id(model.stack)] = model.stack, self._readable(model.stack)
        rows = known[1]
        return rows if rows is not None and 0 <= model.row < len(rows[0]) else None

    def _readable(self, stack: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """``stack``'s tensors as rows (``stacked_rows``) where they are float32 arrays of as
        many rows and, after the first such stack, of its shapes; else None."""
        arrays = [stack.get(name) for name in self.names]
        if not self.names or not all(isinstance(a, np.ndarray) and a.dtype == np.float32
                                     and a.ndim >= 1 for a in arrays):
            return None
        shapes = [a.shape for a in arrays]  # type: ignore[union-attr]
        if any(shape[0] != shapes[0][0] for shape in shapes):
            return None
        if not self.shapes:
            self.shapes = [shape[1:] for shape in shapes]
            self.totals = [np.zeros(int(np.prod(shape))) for shape in self.shapes]
        elif [shape[1:] for shape in shapes] != self.shapes:
            return None
        return [stacked_rows(a) for a in arrays]  # type: ignore[arg-type]
