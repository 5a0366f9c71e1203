"""FedBuff's buffer summed as its updates arrive: rows of the cohorts' kept stacks, compiled.

FedBuff (``strategies.fedbuff``) sums the trained models that started from one model in
arrival order, one float64 addition per model (``strategies.asynchronous.OrderedSum``). A
synchronous round sums each chunk of clients while it is in cache; FedBuff cannot - a client is
added when the server hears of it, long after its chunk trained - so every kept row is read
back from memory, ~0.03 CPU-ms per update of the engine benchmark's MLP (263 KB a row). The
event loop's ``KeptRowSum`` adds the heard rows BATCH at a time in a compiled loop
(``fedtune.server.chunk_passes.add_rows_in_order``: NumPy's per-row casting additions read a
row at half the speed), on the main thread, between the trainings. (It ran on a worker thread
beside the training until 2026-12-06: on two cores the thread competed with torch's own
threads, and the server updates of FedBuff K = 1,000 took 16 % longer than summing here,
BENCHMARKS.md, the virtual clock.) ``result`` gives the same bits as adding the models one by
one in arrival order.

A model that is not a row of a cohort's kept float32 stack (a Ray actor's reply, one trained
alone) is added at ``result``, in order, after everything before it; so is every model after
it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numba.typed import List

from fedtune.server.chunk_passes import add_rows_in_order, stacked_rows
from fedtune.server.stacked_rows import StackedRow
from strategies.asynchronous import NDArrays, OrderedSum, add_in_order

BATCH = 64  # rows added in one compiled call: one per chunk's worth of arrivals


class KeptRowSum(OrderedSum):
    """An ``OrderedSum`` whose rows of kept stacks are added BATCH at a time as they arrive."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)  # ``models``: the ones added at ``result``, in order
        self.batch: list[StackedRow] = []
        self.lengths: dict[int, int] = {}  # id(stack) -> its rows the loop can add (0: none)
        self.shapes: list[tuple[int, ...]] = []  # each tensor's, from the first such stack
        # the stacks seen, by id, each tensor's stacks as the compiled loop reads them, and
        # the totals
        self.places: dict[int, int] = {}
        self.held: list[Mapping[str, np.ndarray]] = []  # alive while their ids are keys
        self.rows: dict[str, List] = {}
        self.totals: NDArrays = {}

    def add(self, model: Mapping[str, np.ndarray]) -> None:
        if self.models or not self._summable(model):  # it, and all after it, at ``result``
            self.models.append(model)
            return
        self.batch.append(model)  # type: ignore[arg-type]
        if len(self.batch) >= BATCH:
            self._add_batch()

    def result(self) -> NDArrays:
        if self.batch:
            self._add_batch()
        totals = self.totals or {name: np.zeros(np.shape(self.models[0][name]))
                                 for name in self.names}
        add_in_order(totals, self.models)
        return totals

    def _summable(self, model: Mapping[str, np.ndarray]) -> bool:
        """Whether ``model`` is a row of a stack whose tensors are float32 rows of the shapes
        the first such stack had (the compiled loop reads them unchecked)."""
        if not isinstance(model, StackedRow):
            return False
        rows = self.lengths.get(id(model.stack))
        if rows is None:
            rows = self.lengths[id(model.stack)] = self._rows_of(model.stack)
        return 0 <= model.row < rows

    def _rows_of(self, stack: Mapping[str, np.ndarray]) -> int:
        """How many rows ``stack`` has where the compiled loop can add them, else 0."""
        arrays = [stack.get(name) for name in self.names]
        if not self.names or not all(isinstance(a, np.ndarray) and a.dtype == np.float32
                                     and a.ndim >= 1 for a in arrays):
            return 0
        shapes = [a.shape for a in arrays]  # type: ignore[union-attr]
        self.shapes = self.shapes or [shape[1:] for shape in shapes]
        same = all(shape[0] == shapes[0][0] for shape in shapes)
        return shapes[0][0] if same and [s[1:] for s in shapes] == self.shapes else 0

    def _add_batch(self) -> None:
        """Add the batch's rows to the totals, in order."""
        batch, self.batch = self.batch, []
        for model in batch:
            if id(model.stack) not in self.places:
                self.places[id(model.stack)] = len(self.held)
                self.held.append(model.stack)
                for name in self.names:
                    self.rows.setdefault(name, List()).append(stacked_rows(model.stack[name]))
        which = np.array([self.places[id(model.stack)] for model in batch], dtype=np.int64)
        rows = np.array([model.row for model in batch], dtype=np.int64)
        for name in self.names:
            if name not in self.totals:
                self.totals[name] = np.zeros(batch[0].stack[name].shape[1:])
            add_rows_in_order(self.rows[name], which, rows, self.totals[name])
