"""In-process runtime: a Flower ``Grid`` that calls the ClientApp directly, without Ray.

For debugging (breakpoints work in client code) and for fast tests. Each virtual client's
``Context.state`` lives in the grid's ``ClientStateStore`` (``fedtune.state.store``) for the
whole run, as Flower's runtimes keep a Context per node; a message's ``Context`` (node config
with the client's ``partition-id``, its state) is made when the message runs, so a client
costs nothing until it has state. Messages are processed one at a time when replies are
pulled, so a caller polling ``pull_messages`` sees clients finish one by one.

The clients run one after another, so a round's wall time is the sum of theirs; the round
timeout is therefore applied to each client's own time, as if they ran side by side (a
client slower than ``client_timeout_s`` gets the timeout error reply a SuperLink sends for
an expired message), and the server does not count the others' time against a client
(``runs_clients_in_turn``).
"""

from __future__ import annotations

import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.app import app as fedtune_client_app
from fedtune.client.app import train_client
from fedtune.config import Config, to_run_config
from fedtune.engine.cohort import (
    BlockAdder,
    DecodedContent,
    TrainFunction,
    cohort_blocks,
    cohort_clients,
    least_block,
    run_block,
)
from fedtune.engine.gpu_memory import explained
from fedtune.protocol import (
    DATA_PATH,
    INSECURE_NOISE_ALLOWED,
    INSECURE_NOISE_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
)
from fedtune.results.run_dir import RunDirectory
from fedtune.server.app import run_federated
from fedtune.server.exchange import RunStopped
from fedtune.server.grid import CohortGrid, CohortResult, CohortSpec, NodeRange
from fedtune.server.reporting import Reporter
from fedtune.state.store import ClientStateStore
from fedtune.task import parsed_run_config, process_threads, run_config_resources

NODE_ID_OFFSET = 1000  # node ids below this are Flower's own (0: none, 1: SuperLink)


def node_config(client_id: int, num_clients: int,
                run_config: Mapping[str, bool | int | float | str],
                node_configs: Sequence[Mapping[str, bool | int | float | str]] = (),
                ) -> dict[str, bool | int | float | str]:
    """Client ``client_id``'s node config; ``node_configs[i]`` adds to client i's (e.g. a
    ``data-path``)."""
    extra = node_configs[client_id] if node_configs else {}
    # a simulation's clients accept the reproducible (not private) noise the run asks for
    allowed = ({INSECURE_NOISE_ALLOWED: True} if run_config.get(INSECURE_NOISE_KEY) is True
               else {})
    return {PARTITION_ID: client_id, NUM_PARTITIONS: num_clients, **allowed, **extra}


def act_as_server(run_id: int) -> None:
    """Messages take their source from the process's task identity: make it the server's."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def error_reply(message: Message, error: BaseException) -> Message:
    """The reply Flower's runtimes send when a ClientApp raises."""
    error = explained(error)  # past an actor's GPU memory cap: one line that names it
    reason = "".join(traceback.format_exception_only(type(error), error)).strip()
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=message)


def timeout_reply(message: Message, limit_s: float, took_s: float) -> Message:
    """The reply a SuperLink sends for a message whose reply did not come in time."""
    return Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                         reason=f"no reply within strategy.round_timeout_s = {limit_s:g}s (the "
                                f"client took {took_s:.1f}s)"), reply_to=message)


class InProcessGrid(CohortGrid):
    """A Grid whose nodes are clients run in this process: a round's train and evaluate phases
    through the cohort path (``fedtune.engine.cohort``, the same blocks as the Ray engine, so
    the same bits), other messages - and every message when ``client_app`` is not fedtune's
    own, or clients read their own files - through the ClientApp."""

    runs_clients_in_turn = True  # exchange: each client's own time is bounded here

    def __init__(self, client_app: ClientApp, run_config: Mapping[str, bool | int | float | str],
                 num_clients: int, run_id: int = 1,
                 node_configs: Sequence[Mapping[str, bool | int | float | str]] = (),
                 train: TrainFunction = train_client,
                 client_timeout_s: float = math.inf) -> None:
        """``train``: what trains a client in the cohort path (tests wrap it);
        ``client_timeout_s``: the most one client may take."""
        self._client_app = client_app
        self._run_config = dict(run_config)
        self._train = train
        self._client_timeout_s = client_timeout_s
        self.runs_cohorts = client_app is fedtune_client_app and not any(
            DATA_PATH in extra for extra in node_configs)
        self._run = Run.create_empty(run_id)
        act_as_server(run_id)
        self._num_clients = num_clients
        self._node_configs = list(node_configs)
        self.node_to_client = NodeRange(NODE_ID_OFFSET, num_clients)
        self.client_states = ClientStateStore.for_config(parsed_run_config(run_config))
        self._queued: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self._num_clients)

    def _client(self, node: int) -> int:
        if node not in self.node_to_client:
            raise ValueError(f"no node {node} in this grid")
        return self.node_to_client[node]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._client(message.metadata.dst_node_id)
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as a SuperLink assigns it
            self._queued[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp for the first queued message asked for; return its reply (none
        left to run: nothing). A client over ``client_timeout_s`` gets a timeout reply; a
        reply that answers another message is passed on with an error reply for this one.
        The client's state after it is kept unless it failed or timed out."""
        for message_id in message_ids:
            message = self._queued.pop(message_id, None)
            if message is None:
                continue
            node = message.metadata.dst_node_id
            client = self._client(node)
            context = Context(run_id=self._run.run_id, node_id=node,
                              node_config=node_config(client, self._num_clients,
                                                      self._run_config, self._node_configs),
                              state=self.client_states.get(client) or RecordDict(),
                              run_config=dict(self._run_config))
            started = time.perf_counter()
            try:
                reply = self._client_app(message, context)
            except Exception as error:  # noqa: BLE001 - a client's failure is its reply
                reply = error_reply(message, error)
            took = time.perf_counter() - started
            if took > self._client_timeout_s:
                return [timeout_reply(message, self._client_timeout_s, took)]
            if not reply.has_error():
                self.client_states.put(client, context.state)
            if reply.metadata.reply_to_message_id != message_id:
                return [reply, error_reply(message, RuntimeError(
                    "the ClientApp's reply answered another message"))]
            return [reply]
        return []

    def discard(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            self._queued.pop(message_id, None)

    def run_cohort(self, messages: list[Message], spec: CohortSpec, timeout_s: float,
                   progress: Callable[[int, int], None] | None = None,
                   stop: threading.Event | None = None) -> CohortResult:
        """Every block in turn, here; a client that takes longer than ``timeout_s`` itself is
        reported ``timeout`` and its work is dropped (the clients run one after another, so
        each one's own time is bounded, not the cohort's)."""
        resources = run_config_resources(self._run_config)
        content = DecodedContent.of(messages[0].content)
        store = self.client_states
        clients = cohort_clients(messages, self.node_to_client, store, resources.config.run.seed)
        blocks = cohort_blocks(clients, messages[0].metadata.message_type, spec,
                               least_block(resources.config))
        adder, done = BlockAdder(), 0
        for block in blocks:
            if stop is not None and stop.is_set():
                raise RunStopped(f"stopped with {len(clients) - done} clients to go")
            result = run_block(resources, content, block, self._train, client_limit_s=timeout_s)
            for client, state in result.states.items():
                store.put_bytes(client, state)
            adder.add(result)
            done += len(block.clients)
            if progress is not None:
                progress(done, len(clients))
        return adder.result()

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while batch := list(self.pull_messages(ids)):
            replies.extend(batch)
        return replies


def run_inprocess(config: Config, reporter: Reporter | None = None,
                  stop: threading.Event | None = None) -> RunDirectory:
    """The ``inprocess`` runtime: every client in this process, one after another (no Ray).

    torch computes with ``engine.client_cpus`` threads meanwhile, as each Ray client does: its
    default (a thread per core) spins idle threads against every other process on a busy
    machine, many times slower for small models (BENCHMARKS.md, in-process threads)."""
    grid = InProcessGrid(fedtune_client_app, to_run_config(config), config.data.num_clients,
                         client_timeout_s=config.strategy.round_timeout_s)
    with process_threads(config.engine.client_cpus):  # then the caller's (a notebook's) own
        return run_federated(grid, config, reporter, stop)
