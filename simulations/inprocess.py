"""A Flower Grid in one process: the real ServerApp and ClientApp, no SuperLink, no Ray.

`InProcessGrid` implements Flower 1.41's `Grid` interface. Every message is serialised to
protobuf and back on the way to a node and on the way back (as the SuperLink does), handed to
the real ClientApp with that node's own `Context` (node config and state persist across
rounds, as a SuperNode keeps them), and an exception in the ClientApp becomes an error reply,
as in Flower. Nodes can be told to fail: `silent` nodes never reply, `crash` nodes raise.

`run_inprocess(run_config, num_nodes)` runs a whole federation through `server.server_app`'s
main with this grid: the round loop, validation and merge are the production code; only the
transport is in memory. It only uses Flower's public API and the two apps, so it also runs
against older checkouts (scripts/check_equivalence.py runs it on the commit before a change).
`fedlora audit` (fedlora.audit) runs its federations with it, reading what the server receives
through `hook`; the tests import it as tests/fake_grid.py's `FakeGrid`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 0


def _transported(message: Message) -> Message:
    """The message as the other side receives it (protobuf round trip, ids kept)."""
    copy = message_from_proto(message_to_proto(message))
    copy.metadata.__dict__.update(message.metadata.__dict__)
    return copy


@dataclass
class InProcessGrid(Grid):
    """Routes each message to `client_app(message, context_of[node])` in this process."""

    client_app: Any
    contexts: dict[int, Context]
    silent: set[int] = field(default_factory=set)  # these nodes never reply
    crash: set[int] = field(default_factory=set)  # these nodes raise in their ClientApp
    # edit a reply before it returns (None: the node stays silent this time)
    hook: Callable[[Message, Message], Message | None] | None = None
    sent: list[Message] = field(default_factory=list)  # every message the server sent
    _ids: Any = field(default_factory=itertools.count)
    _run: Any = None

    # ---- Grid interface ----------------------------------------------------------------------
    def set_run(self, run_id: Any) -> None:
        self._run = run_id

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # as the SuperLink
            self.sent.append(message)
            reply = self.deliver(message)
            if reply is not None:
                replies.append(reply)
        return replies

    # ---- one node ----------------------------------------------------------------------------
    def deliver(self, message: Message) -> Message | None:
        """The node's reply to one message (None for a silent node)."""
        node = message.metadata.dst_node_id
        if node in self.silent or node not in self.contexts:
            return None
        received = _transported(message)
        try:
            if node in self.crash:
                raise RuntimeError(f"node {node} crashed (InProcessGrid.crash)")
            reply = self.client_app(received, self.contexts[node])
        except Exception as err:  # Flower turns a ClientApp exception into an error reply
            reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"),
                            reply_to=received)
        if self.hook is not None:
            reply = self.hook(received, reply)
        return None if reply is None else _transported(reply)


def node_contexts(run_config: dict, num_nodes: int, node_config: Callable[[int], dict] | None
                  = None) -> dict[int, Context]:
    """One Context per node, as the Simulation Engine builds them (partition-id = index)."""
    contexts = {}
    for pid in range(num_nodes):
        config: dict[str, Any] = {"partition-id": pid, "num-partitions": num_nodes}
        config.update(node_config(pid) if node_config else {})
        contexts[1000 + pid] = Context(run_id=1, node_id=1000 + pid, node_config=config,
                                       state=RecordDict(), run_config=dict(run_config))
    return contexts


def run_inprocess(run_config: dict, num_nodes: int, **grid_options: Any) -> InProcessGrid:
    """Run the real ServerApp main over an InProcessGrid of `num_nodes` nodes; returns the grid."""
    from clients.client_app import app as client_app
    from server.server_app import app as server_app

    node_config = grid_options.pop("node_config", None)
    grid = InProcessGrid(client_app, node_contexts(run_config, num_nodes, node_config),
                    **grid_options)
    context = Context(run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    # what a ServerApp process is told by Flower before its main runs
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    server_app(grid, context)
    return grid
