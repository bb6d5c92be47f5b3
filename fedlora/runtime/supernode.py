"""Run a fedlora client node: Flower's SuperNode, guarded, with its resident ClientApp worker.

`run_supernode()` starts `flower-supernode` (as `clients.supernode`, with fedlora's polling
interval) in the foreground and echoes its output. The SuperNode starts its task processes by
name; executables of those names (`GUARDED_COMMANDS`, written by `_write_guard_shims`) come
first on its PATH, so it runs only fedlora's own ClientApp (clients/app_guard.py). With
`isolation="resident"` a `WorkerSupervisor` keeps one long-lived ClientApp worker
(clients.worker) running for every task. On exit, Ctrl-C or SIGTERM the SuperNode, the worker
and every process they started are stopped, and the temp dir deleted. `fedlora client` is the
caller; `NodeExit` tells it how the node ended.

Nothing from Flower is imported here: everything runs in subprocesses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedlora.runtime import pacing
from fedlora.runtime.processes import (
    ProcessTracker,
    RunState,
    SignalGuard,
    child_env,
    cleanup,
    spawn,
    venv_bin,
)

NODE_TAIL_LINES = 80  # a SuperNode's last words can follow a 30-line traceback


# The task commands a SuperNode's SuperExec starts by name (flwr 1.41 TASK_TYPE_TO_COMMAND).
GUARDED_COMMANDS = ("flwr-clientapp", "flwr-agentapp", "flwr-model", "flwr-connector",
                    "flwr-serverapp", "flwr-simulation")


def _write_guard_shims(folder: Path) -> None:
    """One executable per GUARDED_COMMANDS name that runs clients/app_guard.py instead."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in GUARDED_COMMANDS:
        shim = folder / name  # -P: the working directory never goes on sys.path
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -P -m clients.app_guard {name} "$@"\n',
                        encoding="utf-8")
        shim.chmod(0o755)


_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
# What a SuperNode prints when the SuperLink accepted it, and when it stops on its own (as a
# flwr 1.41 SuperNode does once the SuperLink answers it 401: it no longer knows the node).
MARKS = {"connected": "SuperNode ID:", "stopped": "SuperNode terminated gracefully"}


def _echo(stream: IO[bytes], codes: list[int], tail: list[str], seen: set[str]) -> None:
    """Copy a child's output to our stdout, line by line, noting Flower's exit codes, the
    MARKS seen, and keeping the last NODE_TAIL_LINES lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if match := _FLOWER_EXIT.search(line):
            codes.append(int(match.group(1)))
        seen.update(name for name, mark in MARKS.items() if mark in line)
        tail.append(line)
        del tail[:-NODE_TAIL_LINES]
        sys.stdout.write(line)
        sys.stdout.flush()


@dataclass(frozen=True)
class NodeExit:
    """How a SuperNode ended: its exit status, the Flower exit code it reported (e.g. 305
    when it could not connect), and the last lines it printed."""

    status: int
    flower_code: int | None
    output: str
    connected: bool = False  # the SuperLink had accepted it (Flower printed its node ID)
    stopped_itself: bool = False  # it ended on its own, without a Flower error code


WORKER_RESTART_S = 1.0  # pause before starting a worker that died again


class WorkerSupervisor:
    """Keeps the node's resident ClientApp worker (`clients.worker`) running: starts it, and
    starts it again when it dies (counted, logged), until `stop()`."""

    def __init__(self, state: RunState, env: dict[str, str], socket_path: Path) -> None:
        """Supervise a worker listening on `socket_path`, started with `env`."""
        self.state, self.env, self.socket_path = state, env, socket_path
        self.cmd = [sys.executable, "-P", "-m", "clients.worker", "--socket", str(socket_path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Start the worker and watch it."""
        self._thread.start()

    def stop(self) -> None:
        """Stop restarting it (cleanup stops the process itself, by PID)."""
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self.proc = spawn(self.state, self.cmd, self.env, None)
            self.starts += 1
            code = self.proc.wait()
            if self._stopped.is_set():
                return
            print(f"[fedlora] the ClientApp worker (pid {self.proc.pid}) ended with code {code}; "
                  f"starting it again (start {self.starts + 1})", file=sys.stderr, flush=True)
            self._stopped.wait(WORKER_RESTART_S)


def run_supernode(flags: list[str], isolation: str = "resident",
                  poll_s: float = pacing.NODE_POLL_S) -> NodeExit:
    """Run `flower-supernode FLAGS` in the foreground, echo its output, stop it and its
    ClientApp processes on exit, Ctrl-C or SIGTERM; return how it ended. `isolation`:
    "resident" runs every ClientApp task in one long-lived worker process (clients.worker),
    "subprocess" in a fresh process per message (Flower's default). `poll_s`: an idle
    node's wait between asking the server for a message (clients.supernode)."""
    bin_dir = venv_bin()
    guard = SignalGuard()
    guard.install()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-node-"))
    state = RunState(tmp=tmp, tag=uuid.uuid4().hex)
    code, flower_codes, tail, seen = 1, list[int](), list[str](), set[str]()
    worker: WorkerSupervisor | None = None
    try:
        try:
            env = child_env(bin_dir, Path(os.environ.get("FLWR_HOME", tmp / "flwr_home")),
                            tmp / "ray", state.tag)
            # The SuperNode starts its task processes by name: ours come first on its PATH,
            # so it runs only fedlora's own ClientApp (clients/app_guard.py).
            _write_guard_shims(tmp / "guard")
            env["PATH"] = os.pathsep.join([str(tmp / "guard"), env["PATH"]])
            env[pacing.SUPEREXEC_POLL_ENV] = str(pacing.SUPEREXEC_POLL_S)
            state.tracker = ProcessTracker(state.tag, [tmp])
            if isolation == "resident":
                env["FEDLORA_WORKER_SOCKET"] = str(tmp / "worker.sock")
                worker = WorkerSupervisor(state, env, tmp / "worker.sock")
                worker.start()
            supernode = [sys.executable, "-P", "-m", "clients.supernode",
                         "--poll-interval", str(poll_s), *flags]
            node = spawn(state, supernode, env, subprocess.PIPE)
            state.superlink = node  # stopped by kill_run_processes like a SuperLink
            state.tracker.start()
            # The SuperExec child inherits stdout, so EOF can come long after the SuperNode
            # exits: copy output in a thread and end when the SuperNode process ends.
            echo = threading.Thread(target=_echo, args=(node.stdout, flower_codes, tail, seen),
                                    daemon=True)
            echo.start()
            code = node.wait()
            echo.join(timeout=2.0)
        finally:
            guard.cleaning = True
            if worker is not None:
                worker.stop()
            cleanup(state)
    finally:
        guard.restore()
    guard.raise_pending()
    flower_code = flower_codes[0] if flower_codes else None
    return NodeExit(code, flower_code, "".join(tail), "connected" in seen,
                    "stopped" in seen and flower_code is None)
