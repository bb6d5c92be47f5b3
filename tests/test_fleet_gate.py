"""The fleet gate on a fedlora server's public address (server/fleet_gate.py): it forwards the
Fleet API unchanged and refuses everything else. A real gate process in front of a recording
upstream; the end-to-end check with a real SuperLink and the Flower CLI is in
test_deployment.py."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.fleet_gate import FLEET_ROUTES, MAX_BODY_BYTES, is_open


def test_the_open_routes_are_exactly_what_a_flower_supernode_calls():
    import flwr.supernode.fleet_http_client as client

    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', Path(client.__file__).read_text()))
    assert {path for _, path in FLEET_ROUTES} == called and len(called) == 12


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/stop-run"), ("POST", "/v1/control/register-supernode"),
    ("POST", "/v1/runtime/pull-messages"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/pull-messages/"),
    ("GET", "/v1/fleet/pull-messages"), ("POST", "/V1/FLEET/PULL-MESSAGES"),
])
def test_everything_but_the_fleet_api_is_closed(method, path):
    assert not is_open(method, path)


class Recorder(BaseHTTPRequestHandler):
    """Upstream that records each request and answers with a body of its own."""

    seen: list[tuple[str, str, dict, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append(("POST", self.path, dict(self.headers), body))
        answer = b"upstream:" + body[::-1]
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("x-flower", "kept")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gate():
    """A gate process on a free port in front of a Recorder; both stopped afterwards."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.fleet_gate", "--listen",
                             f"127.0.0.1:{port}", "--upstream",
                             f"127.0.0.1:{upstream.server_address[1]}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        Recorder.seen = []
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        upstream.shutdown()
        upstream.server_close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_fleet_request_passes_unchanged_with_its_signature_headers(gate):
    base, _ = gate
    body = bytes(range(256)) * 100
    status, headers, answer = post(f"{base}/v1/fleet/pull-messages?x=1", body,
                                   {"flwr-public-key": "a2V5", "flwr-signature": "c2ln",
                                    "content-type": "application/protobuf"})
    assert status == 200 and answer == b"upstream:" + body[::-1]
    assert headers["x-flower"] == "kept"
    [(method, path, seen_headers, seen_body)] = Recorder.seen
    assert (method, path, seen_body) == ("POST", "/v1/fleet/pull-messages?x=1", body)
    assert seen_headers["flwr-public-key"] == "a2V5" and seen_headers["flwr-signature"] == "c2ln"


def test_a_control_request_is_refused_with_the_reason_and_logged(gate):
    base, proc = gate
    status, _, answer = post(f"{base}/v1/control/start-run", b"fab")
    assert status == 404 and b"serves only the Fleet API" in answer
    assert Recorder.seen == []  # the SuperLink never heard of it
    proc.terminate()
    log = proc.communicate(timeout=30)[0]
    assert "refused POST /v1/control/start-run from 127.0.0.1:" in log


def test_an_oversized_body_is_refused(gate):
    base, _ = gate
    status, _, _ = post(f"{base}/v1/fleet/push-object", b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413 and Recorder.seen == []
