"""The fast engine's Ray actor: one long-lived process that serves many virtual clients.

An actor gets the ClientApp and the run config once. ``ready`` loads what the task needs (the
federation's index arrays, the encoded data, one model) once; then ``serve`` runs one client's
message after another on that resident model. A message's ArrayRecords come from Ray's object
store, where the driver put them once per push; the actor reads each of them once. The
client's ``Context`` is rebuilt for every message from the node config and the state the
driver ships with the task (the driver keeps every client's state between rounds, as Flower's
simulation does), and the state after the message goes back with the reply.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import ray
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from fedtune import protocol
from fedtune.config import RunConfigValue
from fedtune.engine.inprocess import error_reply
from fedtune.protocol import MAX_ANY_EXAMPLES
from fedtune.server.folded import WeightedSum, strip_arrays
from fedtune.server.screening import check_train_reply
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import limit_threads, run_config_resources

ARRAYS_KEPT = 4  # distinct pushed ArrayRecords an actor keeps decoded (train + evaluate, twice)


@dataclass
class ClientTask:
    """One message for one virtual client, as it travels to an actor."""

    metadata: Metadata
    content: RecordDict  # the message's records except its ArrayRecords
    arrays: dict[str, ray.ObjectRef]  # its ArrayRecords, by record key, in the object store
    order: tuple[str, ...]  # record keys in the message's order
    node_config: dict[str, RunConfigValue]
    state: RecordDict | None  # the client's Context.state; None = empty
    fold: str = ""  # partial-sum key: fold the training update instead of returning it

    def message(self, arrays: dict[str, ArrayRecord]) -> Message:
        records = {key: arrays[key] if key in arrays else self.content[key] for key in self.order}
        return Message(metadata=self.metadata, content=RecordDict(records))


@dataclass
class ClientOutcome:
    """The reply to a task and the client's state after it (None: still empty)."""

    reply: Message
    state: RecordDict | None
    seconds: float  # how long the actor took
    folded: bool = False  # the update went into the actor's partial sum


@dataclass
class PartialSum:
    """What ``take_sum`` returns: one fold key's running sum and the messages in it."""

    total: WeightedSum
    message_ids: list[str]


class ClientWorker:
    """Serves virtual clients one message at a time (wrapped by ``ray.remote`` in the pool)."""

    def __init__(self, client_app: ClientApp, run_config: dict[str, RunConfigValue],
                 run_id: int, threads: float) -> None:
        self.client_app = client_app
        self.run_config = run_config
        self.run_id = run_id
        self.threads = threads
        self.arrays: OrderedDict[ray.ObjectRef, ArrayRecord] = OrderedDict()
        self.sums: dict[str, PartialSum] = {}
        self.max_examples = MAX_ANY_EXAMPLES  # what a folded reply may claim (set by ready)
        self.answers: dict[str, str] = {}  # reply records answering a sent one (set by ready)

    def ready(self) -> str:
        """Load data and model once; return the Ray node this actor runs on."""
        limit_threads(self.threads)
        resources = run_config_resources(self.run_config)
        _ = resources.model
        self.max_examples = resources.max_train_examples()
        self.answers = dict(STRATEGIES[resources.config.strategy.name].answers)
        # torch's optimizers import torch._dynamo on first use, which takes seconds: pay for it
        # while starting, not inside the first client's task (and its timeout)
        importlib.import_module("torch._dynamo")
        return f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"

    def serve(self, tasks: list[ClientTask]) -> list[ClientOutcome]:
        """Run the tasks one after another; one call for several clients costs Ray one call."""
        return [self._serve_one(task) for task in tasks]

    def _serve_one(self, task: ClientTask) -> ClientOutcome:
        started = time.perf_counter()
        message = task.message({key: self._arrays(ref) for key, ref in task.arrays.items()})
        context = Context(run_id=self.run_id, node_id=task.metadata.dst_node_id,
                          node_config=task.node_config, state=task.state or RecordDict(),
                          run_config=self.run_config)
        try:
            reply = self.client_app(message, context)
            folded = (bool(task.fold) and not reply.has_error()
                      and check_train_reply(message, reply, self.max_examples,
                                            self.answers) is None)
            if folded:
                self._fold(task, reply)
        except Exception as error:  # noqa: BLE001 - a client's failure is its reply
            reply, folded = error_reply(message, error), False
        keep_state = not reply.has_error() and (task.state is not None or len(context.state) > 0)
        return ClientOutcome(reply, context.state if keep_state else None,
                             time.perf_counter() - started, folded)

    def take_sum(self, fold: str) -> PartialSum:
        """Hand over (and forget) the partial sum of ``fold``."""
        return self.sums.pop(fold, PartialSum(WeightedSum(), []))

    def _fold(self, task: ClientTask, reply: Message) -> None:
        weight = float(protocol.metric(reply, protocol.NUM_EXAMPLES))
        partial = self.sums.setdefault(task.fold, PartialSum(WeightedSum(), []))
        partial.total.add(strip_arrays(reply), weight)
        partial.message_ids.append(task.metadata.message_id)

    def _arrays(self, ref: ray.ObjectRef) -> ArrayRecord:
        if ref not in self.arrays:
            self.arrays[ref] = ray.get(ref)
            while len(self.arrays) > ARRAYS_KEPT:
                self.arrays.popitem(last=False)
        return self.arrays[ref]
