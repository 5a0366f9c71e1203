"""A SuperNode's state-dir: its client's state outlives a new Flower run (a restarted SuperLink,
a resumed server), a replayed round starts from the state it started from the first time, and
nothing but the client's own lasting state is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from fedtune import protocol
from fedtune.client.app import app as fedtune_app
from fedtune.client.node_state import NodeStateError, NodeStateFiles, node_state_mod
from fedtune.config import to_run_config
from fedtune.engine.inprocess import InProcessGrid, act_as_server
from fedtune.server.app import run_federated
from fedtune.server.grid import WrappedGrid
from tests.conftest import tiny_config

RUN_KEY = "ab" * 16

counting = ClientApp(mods=[node_state_mod])


@counting.train()
def count(message: Message, context: Context) -> Message:
    """Counts its trainings in its state; keeps a stand-in for SecAgg+'s round keys too."""
    calls = int(context.state["calls"]["count"]) + 1 if "calls" in context.state else 1
    context.state["calls"] = MetricRecord({"count": calls})
    context.state[protocol.SECAGG_STATE] = ConfigRecord({"mask-seed": b"secret"})
    return Message(RecordDict({"metrics": MetricRecord({"calls": calls})}), reply_to=message)


class Node:
    """One SuperNode with a state-dir: a fresh Context per Flower run."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.context = self.new_flower_run()

    def new_flower_run(self) -> Context:
        self.context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                               node_config={protocol.PARTITION_ID: 3,
                                            protocol.STATE_DIR: str(self.state_dir)})
        return self.context

    def train(self, server_round: int, session: str, start: int = 0,
              checkpointed: int = 0, run_key: str = RUN_KEY) -> int:
        act_as_server(1)
        record = ConfigRecord({protocol.RUN_KEY: run_key, protocol.SESSION: session,
                               protocol.SESSION_START: start,
                               protocol.CHECKPOINTED_ROUND: checkpointed})
        message = Message(RecordDict({
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round}),
            protocol.NODE_STATE: record}), 7, "train")
        return int(counting(message, self.context).content["metrics"]["calls"])

    @property
    def files(self) -> NodeStateFiles:
        return NodeStateFiles(self.state_dir / RUN_KEY / "client-3")

    def rounds(self) -> list[int]:
        return [round_ for round_, _ in self.files.versions()]


FIRST, SECOND = "1" * 32, "2" * 32


def test_a_new_flower_run_goes_on_from_the_state_on_disk(tmp_path):
    node = Node(tmp_path)
    assert [node.train(r, FIRST) for r in (1, 2)] == [1, 2]
    node.new_flower_run()  # the SuperLink restarted, the server resumed after round 2
    assert node.train(3, SECOND, start=2) == 3
    node.new_flower_run()  # the SuperNode restarted in the same session
    assert node.train(4, SECOND, start=2) == 4
    assert node.rounds() == [1, 2, 3, 4]
    saved = node.files.load_before(5)
    assert list(saved.keys()) == ["calls"]  # SecAgg+'s round keys are never written


def test_a_replayed_round_starts_from_the_state_it_started_from(tmp_path):
    node = Node(tmp_path)
    # the server's checkpoint of round 1 is its last before it stops during round 3
    assert [node.train(r, FIRST, checkpointed=min(r - 1, 1)) for r in (1, 2, 3)] == [1, 2, 3]
    first_time = {path.name for _, path in node.files.versions()}
    node.new_flower_run()  # the server resumes from its checkpoint of round 1
    assert node.train(2, SECOND, start=1, checkpointed=1) == 2  # not 4
    assert node.rounds() == [1, 2]  # round 3 of the replaced session is gone
    assert node.train(3, SECOND, start=1, checkpointed=2) == 3
    assert {path.name for _, path in node.files.versions()} <= first_time  # the same bytes
    assert node.rounds() == [2, 3]  # nothing resumes before round 2 any more


def test_a_damaged_version_and_a_hostile_run_key_are_refused(tmp_path):
    node = Node(tmp_path)
    node.train(1, FIRST)
    (_, path), = node.files.versions()
    path.write_bytes(path.read_bytes() + b"\0")
    node.new_flower_run()
    with pytest.raises(NodeStateError, match=f"node state file {path} does not match its name"):
        node.train(2, SECOND, start=1)
    with pytest.raises(NodeStateError, match=r"node-state.run-key = '../../etc' is not allowed: "
                                             r"must be 32 hex digits"):
        node.train(2, SECOND, run_key="../../etc")


SCAFFOLD = ["strategy.name=scaffold", "client.optimizer=sgd", "client.lr=0.05",
            "strategy.fraction_train=1.0", "strategy.fraction_evaluate=0.5"]


def deployment_grid(config, state_dir: Path | None) -> WrappedGrid:
    """fedtune's ClientApp behind a Grid the server takes for a deployment: it keeps no client
    state for checkpoints, and a new one is a new Flower run (every Context empty)."""
    extra = {protocol.STATE_DIR: str(state_dir)} if state_dir else {}
    inner = InProcessGrid(fedtune_app, to_run_config(config), config.data.num_clients,
                          node_configs=[extra] * config.data.num_clients)
    return WrappedGrid(inner)


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("state_dir", [True, False], ids=["state-dir", "no-state-dir"])
def test_scaffold_variates_outlive_a_resumeddeployment_grid_run(tmp_path, state_dir):
    """SCAFFOLD on 'SuperNodes' whose server stops after round 3 with its checkpoint of round 2
    and resumes in a new Flower run: with a state-dir the clients replay round 3 from their
    variates of round 2 and the run ends as the uninterrupted one, bit for bit; without one
    their variates restart at zero and it does not."""
    reference = tiny_config(tmp_path / "a", "run.rounds=4", *SCAFFOLD)
    run_federated(deployment_grid(reference, tmp_path / "nodes-a"), reference)
    nodes = tmp_path / "nodes-b" if state_dir else None
    config = tiny_config(tmp_path / "b", "run.rounds=3", "run.checkpoint_every=2", *SCAFFOLD)
    run_federated(deployment_grid(config, nodes), config)
    config.run.rounds, config.run.resume = 4, True
    resumed = run_federated(deployment_grid(config, nodes), config).path
    ours, theirs = _weights(resumed), _weights(Path(reference.run.dir))
    same = all(np.array_equal(ours[name], theirs[name]) for name in theirs)
    assert same == state_dir
    if state_dir:  # one run key, a folder per client, the versions a resume may need
        folders = sorted(nodes.glob("*/client-*"))
        assert [folder.name for folder in folders] == [f"client-{c}" for c in range(4)]
        assert [r for r, _ in NodeStateFiles(folders[0]).versions()] == [2, 3, 4]
