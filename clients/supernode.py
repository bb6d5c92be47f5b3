"""Flower's `flower-supernode` with fedlora's polling intervals (fedlora.runtime.pacing).

A flwr 1.41 SuperNode that finds no message waiting sleeps a hard-coded 3 s before it asks the
server again: on average a message waits 1.5 s before the node even sees it, a cost every round
pays. `fedlora client` starts its SuperNode through this module, which sets that wait to
`--poll-interval` (default 1 s) and the node's local waits to fedlora's
(`fedlora.runtime.pacing.pace_supernode`); everything else is Flower's own SuperNode. An idle
node asks the server once per interval (one small HTTPS request): raise it for hundreds of
nodes.

    python -m clients.supernode [--poll-interval S] FLOWER_SUPERNODE_ARGS...
"""

from __future__ import annotations

import sys

from fedlora.runtime.pacing import NODE_POLL_S, pace_supernode


def main(argv: list[str] | None = None) -> int:
    """Run the SuperNode with the polling interval from `--poll-interval` (first argument)."""
    args = list(sys.argv[1:] if argv is None else argv)
    poll_s = NODE_POLL_S
    if args[:1] == ["--poll-interval"]:
        poll_s = float(args[1])
        del args[:2]
    pace_supernode(poll_s)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
