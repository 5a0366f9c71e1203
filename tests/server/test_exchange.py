"""Only a reply to a message still waiting, from the node it went to, ends the wait."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedtune.server.exchange import exchange
from tests.strategy_messages import node_grid


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class ReplayingGrid:
    """A SuperLink-like grid (the server waits for it with a deadline) whose nodes answer an
    old message, answer twice, and answer for another node, before the real answer."""

    def __init__(self, old: Message) -> None:
        self.grid = node_grid(2)
        self.old = old
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = list(messages)
        return self.grid.push_messages(self.sent)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        first, second = self.sent
        if self.pulls == 1:
            forged = Message(RecordDict({"c": ConfigRecord()}), reply_to=second)
            forged.metadata.__dict__["_src_node_id"] = first.metadata.dst_node_id
            return [Message(RecordDict(), reply_to=self.old),  # an answer to an old message
                    forged]  # node 1000 answering for node 1001
        if self.pulls == 2:
            return [Message(RecordDict(), reply_to=first)]
        if self.pulls == 3:
            return [Message(RecordDict(), reply_to=first),  # the same answer again
                    Message(RecordDict(), reply_to=second)]
        return []


def test_stale_duplicate_and_forged_replies_are_dropped_and_counted():
    old = Message(RecordDict(), 1000, "train")
    old.metadata.__dict__["_message_id"] = "an-old-message"
    grid = ReplayingGrid(old)
    messages = [Message(RecordDict(), node, "train") for node in (1000, 1001)]
    result = exchange(grid, messages, timeout_s=30)
    assert result.dropped == 3
    assert [r.metadata.reply_to_message_id for r in result.replies] == [
        m.metadata.message_id for m in messages]
    assert "c" not in result.replies[1].content  # node 1001's own answer, not the forgery
    assert result.timed_out == [] and grid.pulls == 3  # the wait ended at the real answers
