"""What a fedlora node executes for a task: fedlora's own installed ClientApp, nothing else.

A Flower SuperNode runs whatever app bundle (FAB) a run brings: `flwr-clientapp` installs the
bundle, puts it on `sys.path` and imports the ClientApp it names, so whoever can submit a run
can run code on every node. A fedlora node trusts only the code installed on it. `fedlora
client` therefore puts this guard first on the SuperNode's PATH under the names of Flower's
task commands (`fedlora.runtime.supernode.GUARDED_COMMANDS`):

* `flwr-clientapp`: Flower's own ClientApp process, except that the bundle is checked
  (`bundle_problem`) and never installed, and the ClientApp run is `clients.client_app:app`
  from this installation. A bundle that carries any file besides its `pyproject.toml`, or
  names another ClientApp, is refused before anything from it executes; the server gets an
  error reply that says why. Runtime dependency installation stays off.
* every other task command (`flwr-agentapp`, `flwr-model`, ...): refused outright.

With the resident worker (`fedlora client`'s default, `clients.worker`), `flwr-clientapp` is
only a hand-off: it passes its command line (the task's token) over the Unix socket named by
`WORKER_SOCKET_ENV` to the worker, which runs the task in its long-lived process with the same
bundle check, and exits with the worker's code. It imports neither torch nor flwr. When no
worker answers within WORKER_WAIT_S (it is being restarted), the task runs here as above.

This leans on two names inside `flwr.supernode.runtime.run_clientapp` (flwr 1.41, pinned);
`main` checks that they exist and stops with a clear message if an upgrade moved them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
import time
import tomllib
import zipfile
from typing import Any

CLIENTAPP = "clients.client_app:app"  # fedlora's ClientApp, as its app bundles name it
BUNDLE_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})  # what `flwr run` packs for us
WORKER_SOCKET_ENV = "FEDLORA_WORKER_SOCKET"  # set by `fedlora client` in resident mode
WORKER_WAIT_S = 30.0  # how long a hand-off waits for a worker that is (re)starting


def node_logging() -> None:
    """fedlora's own log lines (model loads, ignored keys) on stderr, as `[fedlora] ...`."""
    logger = logging.getLogger("fedlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fedlora] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class BundleRefused(RuntimeError):
    """The run's app bundle is not fedlora's; nothing from it was executed."""


def bundle_problem(content: bytes) -> str | None:
    """Why this node will not run the app bundle `content` (None: it is fedlora's own)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            pyproject = fab.read("pyproject.toml") if "pyproject.toml" in names else None
    except (zipfile.BadZipFile, OSError) as exc:
        return f"the app bundle is not a readable FAB zip ({exc})"
    extra = sorted(set(names) - BUNDLE_FILES)
    if extra:
        return (f"the app bundle carries files of its own ({', '.join(extra[:5])}"
                f"{', ...' if len(extra) > 5 else ''}); a fedlora node runs only the fedlora "
                f"installed on it, from a bundle holding just pyproject.toml")
    if pyproject is None:
        return "the app bundle has no pyproject.toml"
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"the app bundle's pyproject.toml does not parse ({exc})"
    named = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if named.get("clientapp") != CLIENTAPP:
        return (f"the app bundle names ClientApp {named.get('clientapp')!r}; a fedlora node "
                f"runs only its own {CLIENTAPP!r}")
    return None


def _check_instead_of_install(fab_file: Any, *_args: Any, **_kwargs: Any) -> None:
    """Stands in for flwr's install_from_fab: refuse a foreign bundle, install nothing."""
    problem = bundle_problem(fab_file if isinstance(fab_file, bytes) else b"")
    if problem:
        print(f"[fedlora] refused a task: {problem}", file=sys.stderr, flush=True)
        raise BundleRefused(f"refused by the node: {problem}")


def _fedlora_loader(*_args: Any, **_kwargs: Any):
    """Stands in for flwr's get_load_client_app_fn: always this installation's ClientApp."""
    def load(*_ids: Any) -> Any:
        from clients.client_app import app

        return app
    return load


def hand_to_worker(path: str, argv: list[str], wait_s: float = WORKER_WAIT_S) -> int | None:
    """Pass the task `flwr-clientapp ARGV` to the resident worker listening on `path` and wait
    until it has run it: the worker's exit code, or None when no worker answered (the task
    was not touched and can run here)."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps({"argv": argv}).encode() + b"\n")
        stream.flush()
        line = stream.readline()
    if not line:  # the worker died with the task; the server sees no reply (round-timeout)
        print("[fedlora] the ClientApp worker ended while it ran this task", file=sys.stderr,
              flush=True)
        return 1
    return int(json.loads(line).get("code", 1))


def run_clientapp(argv: list[str]) -> int:
    """Flower's `flwr-clientapp` with the bundle checked and our ClientApp loaded: handed to
    the resident worker when there is one, else in this process."""
    worker = os.environ.get(WORKER_SOCKET_ENV)
    if worker:
        code = hand_to_worker(worker, argv)
        if code is not None:
            return code
        print(f"[fedlora] no ClientApp worker answered at {worker} within {WORKER_WAIT_S:.0f} "
              f"s; running this task in its own process", file=sys.stderr, flush=True)
    node_logging()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    # flwr's names in its run_clientapp module -> what stands in for them
    stand_ins = {"install_from_fab": _check_instead_of_install,
                 "get_load_client_app_fn": _fedlora_loader}
    missing = [name for name in stand_ins if not hasattr(runtime, name)]
    if missing:
        print(f"[fedlora] this flwr has no {', '.join(missing)} in "
              f"flwr.supernode.runtime.run_clientapp (fedlora's node guard expects flwr "
              f"1.41.*); reinstall fedlora's pinned dependencies", file=sys.stderr)
        return 1
    for name, stand_in in stand_ins.items():
        setattr(runtime, name, stand_in)
    # the bundle's dependencies are never installed on a node
    sys.argv = ["flwr-clientapp",
                *[a for a in argv if a != "--allow-runtime-dependency-installation"]]
    flwr_clientapp()  # exits through flwr_exit with Flower's own exit code
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m clients.app_guard COMMAND ARGS...`: COMMAND is the Flower task command the
    SuperNode meant to start."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m clients.app_guard FLOWER_TASK_COMMAND ARGS...", file=sys.stderr)
        return 2
    if args[0] == "flwr-clientapp":
        return run_clientapp(args[1:])
    print(f"[fedlora] refused a {args[0]} task: a fedlora node runs only fedlora's own "
          f"ClientApp", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
