"""Every wait Flower 1.41 puts into a deployment round, and the value fedlora gives it.

A message from the ServerApp to a node's ClientApp and its reply pass five polling loops.
With Flower's values they cost a train message about 5 s on average, more than a small
model's training; fedlora sets each one (docs/deployment.md, "Where a round's time goes"):

| wait                                          | Flower 1.41                | fedlora          |
|-----------------------------------------------|----------------------------|------------------|
| idle SuperNode asks the server for a message  | 3 s, hard-coded            | NODE_POLL_S (*)  |
| SuperNode looks for its ClientApp's reply     | 0.5 s, hard-coded          | LOCAL_POLL_S     |
| SuperExec asks its SuperNode for a task       | 1 s (env variable)         | SUPEREXEC_POLL_S |
| ServerApp asks its SuperLink for replies      | 3 s (send_and_receive)     | REPLY_POLL_S     |
| a message part not stored yet, first back-off | 1 s (PULL_INITIAL_BACKOFF) | OBJECT_BACKOFF_S |
| ... and the longest back-off (server only)    | 10 s (PULL_BACKOFF_CAP)    | (**)             |

(*) 1 s by default, `fedlora client --poll-interval`.
(**) OBJECT_BACKOFF_CAP_S, for the server's pulls of reply parts (server/replies.py), which
end at the round's deadline: a pull that waits for a dead node's parts stops within this
(plus 20% jitter) of it.

Only the first goes over the network (one small HTTPS request per idle node per interval);
the others poll a process on the same machine. The hard-coded ones are set by replacing a
name inside one Flower module (`pace_supernode`, `fast_object_pulls`), which relies on
flwr 1.41 internals (pinned); each replacement checks that the name it replaces exists.
"""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import Any

NODE_POLL_S = 1.0
LOCAL_POLL_S = 0.05
SUPEREXEC_POLL_S = 0.1
REPLY_POLL_S = 0.2
OBJECT_BACKOFF_S = 0.05
# the longest back-off between tries of a reply part the server pulls (Flower: 10 s): a pull
# that waits for a dead node's parts ends at most this long after the round's deadline
OBJECT_BACKOFF_CAP_S = 0.5
# the longest a resident worker waits for a task's message parts at its SuperNode (Flower's
# flwr-clientapp: 2 hours); a task left pending by a stopped run then ends with an error
TASK_INPUT_MAX_S = 600.0
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by Flower's SuperExec

# flwr 1.41's hard-coded sleeps in flwr.supernode.start_client_internal -> which wait
FLOWER_NODE_SLEEPS = {3: "poll", 0.5: "local"}


class PacedTime(ModuleType):
    """The `time` module, except that the SuperNode's two hard-coded polling sleeps last
    the intervals given."""

    def __init__(self, poll_s: float, local_s: float = LOCAL_POLL_S) -> None:
        """Map sleep(3) to `poll_s` and sleep(0.5) to `local_s`."""
        super().__init__("time")
        self.intervals = {"poll": poll_s, "local": local_s}

    def __getattr__(self, name: str) -> Any:
        """Everything but `sleep` is the real time module's."""
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or the interval set for one of Flower's polling waits."""
        which = FLOWER_NODE_SLEEPS.get(seconds)
        time.sleep(self.intervals[which] if which else seconds)


def _replace(module: ModuleType, name: str, value: Any, expected: Any = None) -> None:
    """Set `module.name`, refusing loudly when flwr no longer has it (as 1.41 does)."""
    current = getattr(module, name, None)
    if current is None or (expected is not None and current is not expected):
        raise RuntimeError(f"{module.__name__} has no {name} as fedlora expects (flwr "
                           f"1.41.*); reinstall fedlora's pinned dependencies")
    setattr(module, name, value)


def fast_object_pulls(module: ModuleType) -> None:
    """Make `module`'s pulls of message parts retry after OBJECT_BACKOFF_S (then doubling, as
    Flower's) instead of 1 s: a part is often asked for moments before its push ends."""
    from flwr.supercore.inflatable import inflatable_utils

    original = inflatable_utils.pull_objects
    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is original:
        return  # already paced (a second run in this process)
    _replace(module, "pull_objects",
             functools.partial(original, initial_backoff=OBJECT_BACKOFF_S), original)


def pace_supernode(poll_s: float = NODE_POLL_S) -> None:
    """Give this process's SuperNode loop fedlora's waits (call before it starts)."""
    from flwr.supernode import start_client_internal as loop

    _replace(loop, "time", PacedTime(poll_s), time)
    fast_object_pulls(loop)


def over_superlink(grid: Any) -> bool:
    """Whether `grid` is Flower's grid over a SuperLink (HTTP), whose pulls fedlora paces."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def pace_serverapp() -> None:
    """Give this process's ServerApp grid fedlora's back-off for reply parts."""
    from flwr.superlink.grid import http_grid

    fast_object_pulls(http_grid)
