"""Replies pulled from a SuperLink under one deadline, whatever one node does.

Flower 1.41 sends a message and its parts (RecordDict, ArrayRecords, array chunks) as separate
objects: a node first pushes its reply message, then the parts. `HttpGrid.pull_messages` pulls
each reply's parts with a 2-hour limit, so a node that pushed its reply message and died
before its arrays holds the pull until the SuperLink drops the node's object-push session
(180 s); the round then sees its deadline passed, and the replies of the other nodes that
arrived meanwhile, in time, are never read. `pull_replies` pulls each reply's parts with what
is left of the deadline instead, and answers a reply whose parts did not arrive with an error
reply that says so (`arrays_missing`), so the round names that node and merges the others.

It goes through the grid's own runtime client with Flower's own functions (PullMessages, then
`pull_objects`, then ConfirmMessageReceived, as `HttpGrid.pull_messages` does): flwr 1.41
internals, used only where `per_message_pulls` holds; any other grid or flwr keeps
`Grid.pull_messages`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Message

from fedlora.runtime import pacing

FLOWER_SERIES = "1.41."  # the flwr whose HttpGrid internals `pull_replies` relies on


def per_message_pulls(grid: Any, version: str | None = None) -> bool:
    """Whether `grid` is flwr 1.41's grid over a SuperLink (HttpGrid), whose runtime client
    `pull_replies` pulls through; `version`: the installed flwr's (read when None)."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("flwr")
    return (version.startswith(FLOWER_SERIES) and pacing.over_superlink(grid)
            and all(hasattr(type(grid), name) for name in ("_runtime_client", "run")))


def arrays_missing(timeout: float, detail: str | None = None) -> str:
    """The failure of a node whose reply message arrived but whose arrays did not."""
    if detail is None:
        return (f"its reply message arrived but its arrays did not within round-timeout="
                f"{timeout:g} s")
    return f"its reply message arrived but its arrays could not be pulled: {detail}"


def pull_replies(grid: Any, waiting: set[str], timeout: float,
                 poll_s: float = pacing.REPLY_POLL_S,
                 progress: Callable[[int], object] | None = None) -> Iterator[Message]:
    """The replies to the messages `waiting` (their ids), pulled every `poll_s` seconds until
    all came or `timeout` seconds passed; after the deadline one last pull takes what arrived
    meanwhile. Each reply's parts are pulled with what is left of the deadline (at least one
    try each) and handed on before the next reply's are pulled (the server holds one reply's
    parts at a time): a reply whose parts did not all arrive comes back as an error reply
    (`arrays_missing`) from its node. `grid`: flwr 1.41's HttpGrid (`per_message_pulls`).
    `progress` is told how many replies came so far after each pull."""
    deadline = time.monotonic() + timeout
    waiting = {i for i in waiting if i}  # None: a message Flower could not push
    came = 0
    while waiting:
        last = time.monotonic() >= deadline
        for head, tree in _heads(grid, waiting):
            waiting.discard(head.metadata.reply_to_message_id)
            left = max(0.0, deadline - time.monotonic())
            came += 1
            yield _complete(grid, head, tree, left, timeout)
        if progress is not None:
            progress(came)
        if last:
            break
        if waiting:
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def _heads(grid: Any, waiting: set[str]) -> list[tuple[Any, Any]]:
    """The reply messages (protobuf, without content) the SuperLink has for `waiting`, each
    with its object tree; the SuperLink hands each one out once."""
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611

    res = grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=list(waiting)))
    return list(zip(res.messages_list, res.message_object_trees, strict=True))


def _complete(grid: Any, head: Any, tree: Any, max_time: float, timeout: float) -> Message:
    """The reply `head` with its parts pulled within `max_time` seconds (receipt confirmed),
    or an error reply from its node saying that they did not arrive."""
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_pull_object_fn_protobuf,
    )

    client, run_id, msg_id = grid._runtime_client, grid.run.run_id, head.metadata.message_id
    pull_one = make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id)
    lost: list[str] = []  # why a part is gone for good (not merely late)

    def pull(object_id: str) -> bytes:
        try:
            return pull_one(object_id)
        except inflatable_utils.ObjectPullError as err:
            lost.append(str(err))
            raise

    try:
        contents = inflatable_utils.pull_objects(
            [t.object_id for t in iterate_object_tree(tree)], pull,
            max_time=max_time, max_tries_per_object=None,
            initial_backoff=pacing.OBJECT_BACKOFF_S, backoff_cap=pacing.OBJECT_BACKOFF_CAP_S)
    except inflatable_utils.ObjectPullError:
        return _unavailable(head, arrays_missing(timeout, lost[0] if lost else None))
    client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
        node=grid.node, run_id=run_id, message_object_id=msg_id))
    message = inflatable_utils.inflate_object_from_contents(msg_id, contents)
    assert isinstance(message, Message)
    message.metadata.__dict__["_message_id"] = msg_id  # as HttpGrid.pull_messages does
    return message


def _unavailable(head: Any, reason: str) -> Message:
    """An error reply standing for `head`, from its node, to the message it replies to."""
    from flwr.app import Error, Metadata
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode

    meta = head.metadata
    return make_message(
        metadata=Metadata(run_id=meta.run_id, message_id="", src_node_id=meta.src_node_id,
                          dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                          group_id=meta.group_id, ttl=0,
                          reply_to_message_id=meta.reply_to_message_id,
                          created_at=time.time()),
        error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason))
