"""server.replies: a round's replies pulled under one deadline over flwr 1.41's SuperLink grid.

The grid is Flower's own HttpGrid (its push, Flower's pull functions); only its runtime client
is replaced by `FakeRuntime`, a SuperLink that answers every message at once and holds back
the parts of chosen nodes' replies: for ever (a node that died between pushing its reply
message and its arrays), for a few tries (a slow upload), or gone (object not found).
"""

from __future__ import annotations

import math

import pytest
from fake_grid import FakeGrid
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesResponse,
    PushAppMessagesResponse,
)
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from server.replies import arrays_missing, per_message_pulls, pull_replies
from server.rounds import send_and_receive

NODES = (1, 2, 3)


class FakeRuntime:
    """The SuperLink's runtime API as HttpGrid calls it. Every pushed message is answered at
    once by its node (a MetricRecord naming it); the parts below a reply's message object of
    a node in `late` stay unavailable for that many tries each (math.inf: never, the node
    died), of a node in `gone` are not found."""

    def __init__(self, late: dict[int, float] | None = None, gone: frozenset[int] = frozenset()
                 ) -> None:
        self.late, self.gone = dict(late or {}), gone
        self.objects: dict[str, bytes] = {}
        self.unavailable: dict[str, float] = {}  # object id -> tries it is still unavailable
        self.replies: dict[str, tuple] = {}  # message id -> (reply head, object tree)
        self.confirmed: list[str] = []

    def PushMessages(self, request):
        ids = []
        for proto in request.messages_list:
            sent = message_from_proto(proto)
            node = sent.metadata.dst_node_id
            reply = Message(RecordDict({"metrics": MetricRecord({"node": node})}), reply_to=sent)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            parts = get_all_nested_objects(reply)
            for object_id, obj in parts.items():
                if node in self.gone and object_id != reply.object_id:
                    continue
                self.objects[object_id] = obj.deflate()
                if node in self.late and object_id != reply.object_id:
                    self.unavailable[object_id] = self.late[node]
            self.replies[sent.metadata.message_id] = (
                message_to_proto(remove_content_from_message(reply)), get_object_tree(reply))
            ids.append(sent.metadata.message_id)
        return PushAppMessagesResponse(message_ids=ids, objects_to_push=[], session_id="s")

    def PushObject(self, request):
        raise AssertionError("FakeRuntime asks for no parts of the server's messages")

    def PullMessages(self, request):
        got = [self.replies.pop(i) for i in request.message_ids if i in self.replies]
        return PullAppMessagesResponse(messages_list=[h for h, _ in got],
                                       message_object_trees=[t for _, t in got])

    def PullObject(self, request):
        object_id = request.object_id
        if object_id not in self.objects:
            return PullObjectResponse(object_found=False, object_available=False)
        if self.unavailable.get(object_id, 0) > 0:
            self.unavailable[object_id] -= 1
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=self.objects[object_id])

    def ConfirmMessageReceived(self, request):
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def superlink_grid(runtime: FakeRuntime) -> HttpGrid:
    """Flower's HttpGrid for run 7, talking to `runtime`."""
    grid = HttpGrid(token="test-token")
    grid._client = runtime  # type: ignore[assignment]
    grid.set_run(Run.create_empty(7))
    return grid


@pytest.fixture(autouse=True)
def server_process(monkeypatch):
    """What a ServerApp process of run 7 is told by Flower before its main runs (restored)."""
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def train_messages() -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"round": 2})}), dst_node_id=n,
                    message_type=MessageType.TRAIN) for n in NODES]


@pytest.fixture
def pulls(monkeypatch):
    """The max_time each reply's pull of its parts was given (Flower's pull_objects, spied;
    also where HttpGrid.pull_messages calls it, which gives none: Flower's 2 hours)."""
    given: list[float] = []
    original = inflatable_utils.pull_objects

    def spy(*args, **kwargs):
        given.append(kwargs["max_time"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inflatable_utils, "pull_objects", spy)
    monkeypatch.setattr(http_grid, "pull_objects", spy)
    return given


def by_node(messages: list[Message], replies: list[Message]) -> dict[int, Message]:
    """Each reply under the node its message was sent to."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    return {sent_to[r.metadata.reply_to_message_id]: r for r in replies}


def test_a_node_whose_arrays_never_arrive_is_named_and_the_others_replies_are_kept(pulls):
    runtime = FakeRuntime(late={2: math.inf})
    messages = train_messages()
    replies = by_node(messages, send_and_receive(superlink_grid(runtime), messages,
                                                 timeout=0.5, poll_s=0.01))
    assert sorted(replies) == list(NODES)
    for node in (1, 3):  # node 3's reply is pulled after node 2's stuck pull gave up
        assert not replies[node].has_error()
        assert replies[node].content.metric_records["metrics"]["node"] == node
    stuck = replies[2]
    assert stuck.has_error() and stuck.metadata.src_node_id == 2
    assert stuck.error.reason == arrays_missing(0.5)
    assert stuck.error.reason == ("its reply message arrived but its arrays did not within "
                                  "round-timeout=0.5 s")
    # the stuck pull was bounded by the deadline, not Flower's 2 hours; only the complete
    # replies were confirmed as received
    assert len(pulls) == 3 and all(0.0 <= t <= 0.5 for t in pulls)
    assert sorted(runtime.confirmed) == sorted(replies[n].metadata.message_id for n in (1, 3))


def test_a_reply_whose_arrays_come_late_but_in_time_is_kept(pulls):
    runtime = FakeRuntime(late={1: 3, 3: 2})
    messages = train_messages()
    replies = by_node(messages, send_and_receive(superlink_grid(runtime), messages,
                                                 timeout=30.0, poll_s=0.01))
    assert {n: r.content.metric_records["metrics"]["node"] for n, r in replies.items()} == {
        n: n for n in NODES}
    assert len(runtime.confirmed) == 3


def test_a_reply_whose_arrays_are_gone_says_why(pulls):
    runtime = FakeRuntime(gone=frozenset({3}))
    messages = train_messages()
    replies = by_node(messages, send_and_receive(superlink_grid(runtime), messages,
                                                 timeout=30.0, poll_s=0.01))
    assert [n for n in NODES if not replies[n].has_error()] == [1, 2]
    assert replies[3].error.reason.startswith(
        "its reply message arrived but its arrays could not be pulled: Failed to pull object")
    assert "could not be found" in replies[3].error.reason


def test_only_flower_1_41s_superlink_grid_is_pulled_per_message():
    grid = superlink_grid(FakeRuntime())
    assert per_message_pulls(grid, "1.41.0") is True
    assert per_message_pulls(grid, "1.42.0") is False  # other flwr: Grid.pull_messages
    assert per_message_pulls(FakeGrid(client_app=None, contexts={}), "1.41.0") is False


def test_a_message_flower_could_not_push_is_not_asked_for():
    """HttpGrid.push_messages answers None for a message it could not push: nothing to pull
    for it (its node then has no reply within round-timeout)."""
    runtime = FakeRuntime()
    grid = superlink_grid(runtime)
    [sent] = grid.push_messages(train_messages()[:1])
    replies = list(pull_replies(grid, {None, sent}, timeout=5.0, poll_s=0.01))
    assert [r.metadata.reply_to_message_id for r in replies] == [sent]


def test_pulling_tells_progress_how_many_replies_came_after_each_pull():
    """The round loop's 'waiting for train replies: 2/3 replies, 30 s' lines count these."""
    runtime = FakeRuntime()
    grid = superlink_grid(runtime)
    sent = grid.push_messages(train_messages())
    seen: list[int] = []
    replies = list(pull_replies(grid, set(sent), timeout=5.0, poll_s=0.01,
                                progress=seen.append))
    assert len(replies) == len(NODES) and seen[-1] == len(NODES) and seen == sorted(seen)
