"""The resident ClientApp worker (clients/worker.py) and fedlora's Flower waits
(fedlora/runtime/pacing.py): the Flower internals they rely on, the hand-off from `flwr-clientapp`,
and real deployments where one worker per node serves every message: the base model loaded
once per node, a worker that dies started again, an exception an error reply that leaves the
worker running. Every process a test starts is stopped by that test, by PID."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from test_deployment import free_port, start, stop, wait_for, wait_gone

from clients.app_guard import hand_to_worker
from clients.worker import check_flower
from fedlora.outputs import read_metrics, training_rounds
from fedlora.runtime import pacing


# ---- what the worker relies on ------------------------------------------------------------------
def test_the_installed_flower_is_the_series_the_worker_was_written_for():
    assert check_flower() is None
    problem = check_flower("1.42.0")
    assert problem is not None and "1.41." in problem and "1.42.0" in problem
    assert "--isolation subprocess" in problem


def test_the_flower_internals_the_worker_and_pacing_use_still_exist():
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    assert callable(HeartbeatSender) and callable(_parse_args_run_flwr_clientapp)
    for name in ("PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
                 "SendTaskHeartbeat", "PushTaskOutput"):
        assert hasattr(RuntimeHttpClient, name), name
    assert callable(run_clientapp.push_message) and callable(run_clientapp.push_task_output)
    assert start_client_internal.time is time
    assert start_client_internal.pull_objects is inflatable_utils.pull_objects


def test_flowers_polling_sleeps_last_fedloras_intervals(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    paced = pacing.PacedTime(poll_s=0.7)
    for seconds in (3, 0.5, 7):
        paced.sleep(seconds)
    assert slept == [0.7, pacing.LOCAL_POLL_S, 7]  # other waits stay as Flower wrote them
    assert paced.monotonic is time.monotonic


def test_message_parts_are_pulled_again_after_a_short_backoff(monkeypatch):
    from types import ModuleType

    from flwr.supercore.inflatable import inflatable_utils

    module = ModuleType("some_flower_module")
    module.pull_objects = inflatable_utils.pull_objects  # type: ignore[attr-defined]
    pacing.fast_object_pulls(module)
    pacing.fast_object_pulls(module)  # a second run in the same process: unchanged
    paced = module.pull_objects  # type: ignore[attr-defined]
    assert paced.func is inflatable_utils.pull_objects
    assert paced.keywords == {"initial_backoff": pacing.OBJECT_BACKOFF_S}
    with pytest.raises(RuntimeError, match="flwr 1.41"):
        pacing.fast_object_pulls(ModuleType("moved_elsewhere"))


# ---- the hand-off -------------------------------------------------------------------------------
def test_a_hand_off_without_a_worker_leaves_the_task_to_run_in_its_own_process(tmp_path):
    assert hand_to_worker(str(tmp_path / "nobody.sock"), ["--token", "t"], wait_s=0.3) is None


def serve_once(path: Path, answer: bytes | None) -> tuple[threading.Thread, list[bytes]]:
    """A stand-in worker that reads one request and answers `answer` (None: dies)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    got: list[bytes] = []

    def run() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            got.append(conn.makefile("rb").readline())
            if answer is not None:
                conn.sendall(answer)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_a_hand_off_passes_the_command_line_and_returns_the_workers_code(tmp_path):
    thread, got = serve_once(tmp_path / "w.sock", b'{"code": 0}\n')
    argv = ["--runtime-api-address", "127.0.0.1:1", "--token", "secret"]
    assert hand_to_worker(str(tmp_path / "w.sock"), argv, wait_s=2) == 0
    thread.join(5)
    assert got == [b'{"argv": ["--runtime-api-address", "127.0.0.1:1", "--token", '
                   b'"secret"]}\n']


def test_a_worker_that_dies_with_the_task_fails_it_instead_of_running_it_twice(tmp_path, capsys):
    thread, _ = serve_once(tmp_path / "w.sock", None)
    assert hand_to_worker(str(tmp_path / "w.sock"), ["--token", "t"], wait_s=2) == 1
    thread.join(5)
    assert "worker ended while it ran this task" in capsys.readouterr().err


# ---- real deployments ---------------------------------------------------------------------------
LOADED = re.compile(r"\[fedlora\] base model tiny-llama loaded in [\d.]+ s: load (\d+) in "
                    r"process (\d+)")
READY = re.compile(r"\[fedlora\] ClientApp worker ready \(pid (\d+)")


def loads(log: Path) -> list[tuple[int, int]]:
    """(load number, pid) of every base-model load a node's log reports."""
    return [(int(n), int(pid)) for n, pid in LOADED.findall(log.read_text())]


@pytest.mark.slow
def test_one_worker_per_node_serves_every_round_survives_errors_and_is_restarted(tmp_path):
    """3 nodes, 3 rounds with evaluation. Node 0's worker is killed after round 1: it is
    started again and serves the later rounds. Node 2's data file turns unreadable after it
    started: each of its messages fails, as an error reply of a generic reason (the details
    in the node's log), and its one worker serves them all."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "3",
                    "--output-dir", str(out), "--model", "tiny-llama", "--rounds", "3",
                    "--local-steps", "2", "--run-config",
                    "lr=0.01 dataset-size=90 eval-examples=4 min-replies=2 round-timeout=120"],
                   log)
    data = tmp_path / "site-2.jsonl"
    data.write_text("".join(f'{{"prompt": "{i} + 1 =", "completion": "{i + 1}"}}\n'
                            for i in range(30)))
    logs = [tmp_path / f"node{i}.log" for i in range(3)]
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure",
                    "--partition-id", str(i), "--num-partitions", "2"], logs[i])
             for i in range(2)]
    nodes.append(start(["client", "--server", f"127.0.0.1:{port}", "--insecure",
                        "--data-path", str(data), "--name", "broken-site"], logs[2]))
    try:
        wait_for(lambda: all(READY.search(p.read_text()) for p in logs), server, log)
        data.write_text("{ this is not json\n")
        wait_for(lambda: "round 1: train-loss" in log.read_text(), server, log)
        first_worker = int(READY.search(logs[0].read_text()).group(1))
        os.kill(first_worker, signal.SIGKILL)
        # finished, degraded: the broken site failed every evaluation (EXIT_DEGRADED)
        assert server.wait(timeout=600) == 3, log.read_text()[-3000:]
    finally:
        stop([server, *nodes])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert len(rows[0]["eval-failures"]) == 1  # round 0: before any node gave its name
    for row in rows[1:]:  # each evaluation failure is named, with the generic reason
        assert [f.get("node-name") for f in row["eval-failures"]].count("broken-site") == 1
    assert rows[-1]["clients-replied"] == 2  # node 0's new worker answered the last round
    for row in training_rounds(rows):  # round 0 only evaluates: it counts eval-failed
        assert [f["node-name"] for f in row["failures"]].count("broken-site") >= 1
        # the reply names the kind of failure, not the file or its text (fedlora.node_rules)
        assert any("could not read its data" in f["reason"] and "error id" in f["reason"]
                   and str(data) not in f["reason"] for f in row["failures"])
    # node 1: one worker, one load, every round
    assert [n for n, _ in loads(logs[1])] == [1]
    # node 0: the killed worker's load, then one load in its successor
    restarted = logs[0].read_text()
    assert "the ClientApp worker (pid" in restarted and "starting it again" in restarted
    (first, pid1), (again, pid2) = loads(logs[0])
    assert (first, again) == (1, 1) and pid1 == first_worker and pid2 != pid1
    # node 2: every message failed inside one worker, which was never restarted
    broken = logs[2].read_text()
    assert len(READY.findall(broken)) == 1 and "starting it again" not in broken
    assert len(re.findall(r"error id [0-9a-f]{8}: the \w+ task failed", broken)) >= 3
    assert "not valid JSON" in broken  # the details stay in the node's log
    assert wait_gone() == []


def test_a_task_whose_token_the_supernode_dropped_ends_alone_and_not_the_worker():
    """A hand-off that waited in the socket's backlog longer than the SuperNode kept its token
    (the worker was still importing torch on a loaded machine): every runtime call answers
    401. Flower's retry policy would SIGINT its own process, ending the resident worker and
    every task it holds; here the task ends with code 1 and nothing is signalled."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from clients.worker import Worker

    asked = []

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):
            asked.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"code": 1008, "message": "Runtime task-token authentication failed."}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signals: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    try:
        code = Worker().handle(["--runtime-api-address",
                                f"127.0.0.1:{server.server_address[1]}", "--token", "stale",
                                "--insecure"])
    finally:
        signal.signal(signal.SIGINT, previous)
        server.shutdown()
        server.server_close()
    assert code == 1 and signals == []
    assert "/v1/runtime/pull-task-input" in asked
    assert "/v1/runtime/push-task-output" not in asked  # nothing to report under a stale token
