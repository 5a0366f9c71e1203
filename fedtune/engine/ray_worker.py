"""The fast engine's Ray actor: one long-lived process that serves many virtual clients.

An actor gets the ClientApp and the run config once. ``ready`` loads what the task needs (the
federation's index arrays, the encoded data, one model) once. Then it serves work two ways:

- ``run_blocks``: blocks of a round's cohort (``fedtune.engine.cohort``) - the client wing's
  train or evaluate function per client on the resident model, updates screened and summed
  here. The round's shared records come from Ray's object store, where the driver put them once
  per phase; the actor decodes them once. ``colluders``, called before a train phase's blocks,
  forms collusion groups' updates for every actor (``fedtune.engine.colluders``).
- ``serve``: single Flower messages through the ClientApp (any message a strategy sends outside
  a round's train and evaluate phases), a client's ``Context`` rebuilt for every message.

Either way the driver keeps every client's ``Context.state`` between rounds and ships it with
the work as bytes (``fedtune.state.codec``), and the state after it goes back with the result
when it changed.
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

from fedtune.client.app import train_client
from fedtune.client.attacking import Group, Update
from fedtune.config import RunConfigValue
from fedtune.engine.cohort import (
    BlockResult,
    BlockTask,
    DecodedContent,
    TrainFunction,
    block_sums,
    colluders_updates,
    run_block,
)
from fedtune.engine.colluders import Forming, receive
from fedtune.engine.gpu_memory import cap_gpu_memory
from fedtune.engine.inprocess import error_reply
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.task import limit_threads, run_config_resources

ARRAYS_KEPT = 4  # pushed records an actor keeps decoded (train + evaluate, two rounds)


@dataclass
class ClientTask:
    """One message for one virtual client, as it travels to an actor."""

    metadata: Metadata
    content: RecordDict  # the message's records except its ArrayRecords
    arrays: dict[str, ray.ObjectRef]  # its ArrayRecords, by record key, in the object store
    order: tuple[str, ...]  # record keys in the message's order
    node_config: dict[str, RunConfigValue]
    state: bytes | None  # the client's Context.state as bytes; None = empty

    def message(self, arrays: dict[str, ArrayRecord]) -> Message:
        records = {key: arrays[key] if key in arrays else self.content[key] for key in self.order}
        return Message(metadata=self.metadata, content=RecordDict(records))


@dataclass
class ClientOutcome:
    """The reply to a task and the client's state after it (None: unchanged)."""

    reply: Message
    state: bytes | None
    seconds: float  # how long the actor took


class ClientWorker:
    """Serves virtual clients (wrapped by ``ray.remote`` in the pool)."""

    def __init__(self, client_app: ClientApp, run_config: dict[str, RunConfigValue],
                 run_id: int, threads: float, train: TrainFunction | None = None,
                 gpu_memory: tuple[float, int] = (0.0, 0)) -> None:
        """``train``: what trains one client in a block (default: the client wing's
        ``train_client``; tests wrap it to inject faults); ``gpu_memory``: this actor's GPU
        share and memory cap in MiB (``fedtune.engine.gpu_memory``)."""
        self.client_app = client_app
        self.run_config = run_config
        self.run_id = run_id
        self.threads = threads
        self.train = train
        self.gpu_memory = gpu_memory
        self.pushed: OrderedDict[ray.ObjectRef, object] = OrderedDict()  # decoded, by ref
        self.returned: list[BlockResult] = []  # the last call's results

    def ready(self) -> str:
        """Load data and model once; return where this actor runs: ``node:pid:gpus`` (the Ray
        node, the process, the GPU ids Ray gave it - logical ones on a machine without)."""
        limit_threads(self.threads)
        cap_gpu_memory(*self.gpu_memory)  # before the model takes any GPU memory
        resources = run_config_resources(self.run_config)
        _ = resources.model
        # torch's optimizers import torch._dynamo on first use, which takes seconds: pay for it
        # while starting, not inside the first client's task (and its timeout)
        importlib.import_module("torch._dynamo")
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
        return f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}:{gpus}"

    def run_blocks(self, content: tuple[ray.ObjectRef], tasks: list[BlockTask],
                   forming: list[Forming] = ()) -> list[BlockResult]:
        """Train or evaluate blocks of clients, each with its own result; ``content``: the
        phase's shared records; ``forming``: the collusion groups other actors form this phase
        (``fedtune.engine.colluders``)."""
        for result in self.returned:  # Ray serialised them when the call that made them ended
            block_sums.give_back(result.total)
        decoded = self._pushed(content[0], lambda records: DecodedContent.of(records))
        resources = run_config_resources(self.run_config)
        receive(resources, decoded, forming)
        train = {} if self.train is None else {"train": self.train}
        self.returned = [run_block(resources, decoded, task, **train) for task in tasks]
        return self.returned

    def colluders(self, content: tuple[ray.ObjectRef], groups: list[Group]
                  ) -> dict[Group, Update]:
        """Form the updates the colluders of ``groups`` send in this train phase, for every
        actor (``fedtune.engine.colluders``)."""
        decoded = self._pushed(content[0], lambda records: DecodedContent.of(records))
        resources = run_config_resources(self.run_config)
        return colluders_updates(resources, decoded, groups,
                                 train_client if self.train is None else self.train)

    def serve(self, tasks: list[ClientTask]) -> list[ClientOutcome]:
        """Run the tasks one after another; one call for several clients costs Ray one call."""
        return [self._serve_one(task) for task in tasks]

    def _serve_one(self, task: ClientTask) -> ClientOutcome:
        started = time.perf_counter()
        message = task.message({key: self._pushed(ref, lambda record: record)
                                for key, ref in task.arrays.items()})
        state = state_from_bytes(task.state) if task.state else RecordDict()
        context = Context(run_id=self.run_id, node_id=task.metadata.dst_node_id,
                          node_config=task.node_config, state=state, run_config=self.run_config)
        try:
            reply = self.client_app(message, context)
        except Exception as error:  # noqa: BLE001 - a client's failure is its reply
            reply = error_reply(message, error)
        after = None if reply.has_error() else state_to_bytes(context.state)
        changed = after is not None and after != (task.state or b"")
        return ClientOutcome(reply, after if changed else None, time.perf_counter() - started)

    def _pushed(self, ref: ray.ObjectRef, decode) -> object:
        """What the driver put in the object store once, fetched and decoded once here."""
        if ref not in self.pushed:
            self.pushed[ref] = decode(ray.get(ref))
            while len(self.pushed) > ARRAYS_KEPT:
                self.pushed.popitem(last=False)
        return self.pushed[ref]
