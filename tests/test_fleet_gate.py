"""The fleet gate on a fedlora server's public address (server/fleet_gate.py): it forwards the
Fleet API unchanged, refuses everything else, and holds under abuse (streamed bodies, request
and connection limits, header and body timeouts, rate-limited logs). A real gate process in
front of a recording upstream; the end-to-end check with a real SuperLink and the Flower CLI
is in test_deployment.py."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from server.fleet_gate import (
    FLEET_ROUTES,
    MAX_BODY_BYTES,
    GateLimits,
    LogLimiter,
    TokenBuckets,
    add_limit_arguments,
    is_open,
    limit_argv,
    limits_from_args,
    source_of,
)


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



# ---------------------------------------------------------------- the pure parts


def test_a_source_is_an_ipv4_address_or_an_ipv6_64():
    assert source_of("203.0.113.7") == "203.0.113.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7"


def test_a_token_bucket_grants_the_burst_then_the_rate():
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 10.0) == pytest.approx(0.5)  # 1 token at 2 a second
    assert buckets.take("b", 10.0) == 0.0  # another source has its own bucket
    assert buckets.take("a", 10.5) == 0.0 and buckets.take("a", 10.5) > 0
    buckets.prune(100.0)  # refilled buckets are forgotten: they start full anyway
    assert buckets.buckets == {}


def test_the_log_limiter_shows_n_lines_per_window_then_one_summary():
    logs = LogLimiter(lines=2, interval=10.0)
    shown = [line for i in range(5) for line in logs.admit("1.2.3.4", f"line {i}", 0.0)]
    assert shown == ["line 0", "line 1"]
    assert logs.admit("5.6.7.8", "other", 1.0) == ["other"]
    assert logs.flush(5.0) == []  # the window has not ended
    assert logs.admit("1.2.3.4", "line 5", 10.0) == [
        "suppressed 3 lines from 1.2.3.4 in 10 s (at most 2 per source)", "line 5"]
    assert logs.flush(12.0) == [] and "5.6.7.8" not in logs.windows  # nothing dropped
    assert logs.flush(0.0, everything=True) == [] and logs.windows == {}


def test_limits_round_trip_through_flags_and_refuse_nonsense():
    limits = GateLimits(max_requests=7, rate_per_source=2.5, header_timeout=1.0)
    assert limit_argv(limits) == ["--max-requests", "7", "--rate-per-source", "2.5",
                                  "--header-timeout", "1.0"]
    p = argparse.ArgumentParser()
    add_limit_arguments(p, prefix="gate-")
    args = p.parse_args(["--gate-max-requests", "7", "--gate-rate-per-source", "2.5",
                         "--gate-header-timeout", "1"])
    assert limits_from_args(args, prefix="gate-") == limits
    with pytest.raises(ValueError, match="--body-timeout: expected a number above 0, got 0"):
        GateLimits(body_timeout=0)


# ---------------------------------------------------------------- a real gate process


class Recorder(BaseHTTPRequestHandler):
    """Upstream that records each request and answers with a body of its own. With
    x-test-digest it hashes the body piece by piece instead and answers the digest followed
    by x-test-answer-bytes bytes; with x-test-hold it answers only once `release` is set."""

    seen: list[tuple[str, str, dict, bytes]] = []
    held = 0
    release = threading.Event()

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        if self.headers.get("x-test-hold"):
            type(self).held += 1
            self.release.wait(60)
        if self.headers.get("x-test-digest"):
            self.answer_digest(length)
            return
        body = self.rfile.read(length)
        self.seen.append(("POST", self.path, dict(self.headers), body))
        if error := self.headers.get("x-test-error"):  # a SuperLink that failed
            answer = error.encode()
            self.send_response(500)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        answer = b"upstream:" + body[::-1]
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("x-flower", "kept")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def answer_digest(self, length: int):
        digest, left = hashlib.sha256(), length
        while left:
            piece = self.rfile.read(min(left, 2**16))
            if not piece:
                return  # the gate gave up on this body
            digest.update(piece)
            left -= len(piece)
        size = int(self.headers["x-test-answer-bytes"])
        head = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("content-length", str(len(head) + size))
        self.end_headers()
        self.wfile.write(head)
        for start in range(0, size, 2**16):
            self.wfile.write(pattern(start, min(size, start + 2**16)))

    def log_message(self, *args):
        pass


def pattern(start: int, stop: int) -> bytes:
    """Bytes start..stop of a long deterministic byte string."""
    return bytes((i * 7 + i // 251) % 256 for i in range(start, stop))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_gate(*flags: str):
    """A gate process (with these extra flags) on a free port in front of a Recorder; both
    stopped afterwards, also on failure."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.fleet_gate", "--listen",
                             f"127.0.0.1:{port}", "--upstream",
                             f"127.0.0.1:{upstream.server_address[1]}", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    Recorder.release.set()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        Recorder.seen, Recorder.held = [], 0
        Recorder.release.clear()
        yield f"http://127.0.0.1:{port}", proc
    finally:
        Recorder.release.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        upstream.shutdown()
        upstream.server_close()


@pytest.fixture
def gate():
    """A gate with the default limits."""
    with running_gate() as started:
        yield started


def post(url: str, body: bytes, headers: dict | None = None,
         source: str | None = None) -> tuple[int, dict, bytes]:
    """POST from 127.0.0.1, or from another loopback address `source` (another source)."""
    if source is None:
        request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", "/" + rest, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw(base: str, data: bytes) -> socket.socket:
    """A plain socket to the gate that has sent `data`."""
    host, _, port = base.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the gate sends until it closes the connection."""
    out = b""
    while piece := sock.recv(2**16):
        out += piece
    return out


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
    assert {k.lower(): v for k, v in seen_headers.items()}["content-length"] == str(len(body))


def test_a_control_request_is_refused_with_the_reason_and_logged(gate):
    base, proc = gate
    status, _, answer = post(f"{base}/v1/control/start-run", b"fab")
    assert status == 404 and b"serves only the Fleet API" in answer
    assert Recorder.seen == []  # the SuperLink never heard of it
    proc.terminate()
    log = proc.communicate(timeout=30)[0]
    assert "refused POST /v1/control/start-run from 127.0.0.1:" in log


def test_an_oversized_body_is_refused_before_it_is_read(gate):
    base, _ = gate
    # only the headers are ever sent: the answer comes without waiting for the body
    sock = raw(base, b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: "
                     + str(MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n")
    with sock:
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"over 33554432 bytes" in answer
    assert Recorder.seen == []


def test_a_chunked_body_is_refused_411(gate):
    base, _ = gate
    with raw(base, b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                   b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n") as sock:
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in answer
    assert Recorder.seen == []


def test_a_large_body_streams_byte_exact_while_the_gate_stays_small(gate):
    base, proc = gate
    size = 30 * 2**20  # body and answer each 30 MiB: a gate that held them would grow by 60+
    host, _, port = base.removeprefix("http://").partition(":")
    gate_process = psutil.Process(proc.pid)

    def exchange(n: int) -> tuple[str, bytes]:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = (pattern(s, min(n, s + 2**20)) for s in range(0, n, 2**20))
        conn.request("POST", "/v1/fleet/push-object", body=body,
                     headers={"content-length": str(n), "x-test-digest": "1",
                              "x-test-answer-bytes": str(n)})
        resp = conn.getresponse()
        digest, received = resp.read(64).decode(), hashlib.sha256()
        while piece := resp.read(2**20):
            received.update(piece)
        conn.close()
        return digest, received.digest()

    exchange(2**20)  # warm up: the first request imports and allocates what every one needs
    baseline, peak, done = gate_process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], gate_process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        digest, answer_digest = exchange(size)
    finally:
        done.set()
        sampler.join()
    expected = hashlib.sha256()
    for start in range(0, size, 2**20):
        expected.update(pattern(start, min(size, start + 2**20)))
    assert digest == expected.hexdigest()  # the SuperLink got every byte, in order
    assert answer_digest == expected.digest()  # and the node got the answer's
    growth = peak[0] - baseline
    assert growth < 8 * 2**20, f"the gate grew by {growth / 2**20:.1f} MiB for 30 MiB bodies"


def test_over_the_request_caps_the_answer_is_503_with_retry_after():
    with running_gate("--max-requests", "2", "--max-requests-per-source", "1") as (base, _):
        url = f"{base}/v1/fleet/pull-messages"
        hold = {"x-test-hold": "1"}
        results: list = []
        workers = [threading.Thread(target=lambda s=s: results.append(post(url, b"a", hold, s)))
                   for s in ("127.0.0.1", "127.0.0.2")]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while Recorder.held < 2:  # both are in the gate, waiting on the SuperLink
            assert time.monotonic() < deadline
            time.sleep(0.05)
        same_source = post(url, b"b", source="127.0.0.1")
        third_source = post(url, b"c", source="127.0.0.3")
        Recorder.release.set()
        for w in workers:
            w.join()
        after = post(url, b"d", source="127.0.0.3")
    assert same_source[0] == 503 and same_source[1]["retry-after"] == "1"
    assert b"1 requests from 127.0.0.1 in the gate" in same_source[2]
    assert third_source[0] == 503 and b"2 requests in the gate" in third_source[2]
    assert sorted(r[0] for r in results) == [200, 200] and after[0] == 200
    assert [body for *_, body in Recorder.seen] == [b"a", b"a", b"d"]


def test_a_source_over_its_rate_gets_503_and_others_do_not():
    flags = ("--rate-per-source", "0.01", "--burst-per-source", "3")
    with running_gate(*flags) as (base, _):
        url = f"{base}/v1/fleet/pull-messages"
        statuses = [post(url, b"x")[0] for _ in range(4)]
        refused = post(url, b"x")
        other = post(url, b"x", source="127.0.0.2")
    assert statuses == [200, 200, 200, 503]
    assert refused[0] == 503 and int(refused[1]["retry-after"]) > 60  # 1 token per 100 s
    assert b"too many requests from 127.0.0.1" in refused[2]
    assert other[0] == 200 and len(Recorder.seen) == 4


def test_a_connection_slow_to_send_headers_is_closed():
    with running_gate("--header-timeout", "1") as (base, _):
        idle = raw(base, b"")  # never sends anything
        slow = raw(base, b"POST /v1/fleet/pull-messages HTTP/1.1\r\n")
        for _ in range(10):  # a header line every 0.3 s, never the blank line
            try:
                slow.sendall(b"x-slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.3)
        with idle, slow:
            assert read_all(idle) == b"" and read_all(slow) == b""  # closed, unanswered
        # a prompt request on a fresh connection is still served
        assert post(f"{base}/v1/fleet/pull-messages", b"ok")[0] == 200
    assert [body for *_, body in Recorder.seen] == [b"ok"]


def test_a_stalled_body_is_answered_408():
    with running_gate("--body-timeout", "1") as (base, _):
        with raw(base, b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                       b"content-length: 100\r\n\r\n" + b"y" * 10) as sock:
            answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"no part of the request body" in answer
    # the SuperLink got at most the 10 bytes, then the connection closed: never the request
    assert [len(body) for *_, body in Recorder.seen] in ([], [10])


def test_a_source_over_its_connection_share_is_closed():
    with running_gate("--max-connections-per-source", "2") as (base, _):
        kept = [raw(base, b""), raw(base, b"")]
        extra = raw(base, b"")
        with extra:
            assert read_all(extra) == b""
        other = post(f"{base}/v1/fleet/pull-messages", b"o", source="127.0.0.2")
        for sock in kept:
            sock.close()
    assert other[0] == 200


def test_refusals_are_logged_at_most_n_per_source_then_summarised():
    flags = ("--log-lines-per-source", "5", "--log-interval", "600")
    with running_gate(*flags) as (base, proc):
        host, _, port = base.removeprefix("http://").partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for _ in range(50):  # one connection, 50 refused requests
            conn.request("POST", "/v1/control/start-run", body=b"fab")
            resp = conn.getresponse()
            assert resp.status == 404 and resp.read()
        conn.close()
        post(f"{base}/v1/control/list-runs", b"", source="127.0.0.2")
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    refused = [line for line in log.splitlines() if "refused POST /v1/control/" in line]
    assert sum("from 127.0.0.1:" in line for line in refused) == 5
    assert sum("from 127.0.0.2:" in line for line in refused) == 1
    assert "suppressed 45 lines from 127.0.0.1 in 600 s" in log
    assert "from 127.0.0.2 in" not in log


def test_fedlora_server_passes_its_gate_flags_to_the_gate(tmp_path):
    from fedlora.cli import server
    from server.fleet_gate import parse_args

    p = argparse.ArgumentParser()
    server.add_arguments(p)
    args = p.parse_args(["--gate-max-requests-per-source", "300", "--gate-header-timeout", "5"])
    flags = server.superlink_spec(args, tmp_path).gate_flags
    assert flags == ("--max-requests-per-source", "300", "--header-timeout", "5.0")
    gate_args = parse_args(["--listen", "0.0.0.0:9092", "--upstream", "127.0.0.1:9093", *flags])
    assert limits_from_args(gate_args) == GateLimits(max_requests_per_source=300,
                                                     header_timeout=5.0)
    with pytest.raises(ValueError, match="--gate-body-timeout: expected a number above 0"):
        server.superlink_spec(p.parse_args(["--gate-body-timeout", "-1"]), tmp_path)


def test_at_shutdown_the_gate_logs_its_busiest_source_second(gate):
    base, proc = gate
    for _ in range(3):
        post(f"{base}/v1/fleet/pull-messages", b"p")
    proc.terminate()
    log = proc.communicate(timeout=30)[0]
    [line] = [x for x in log.splitlines() if "served" in x]
    served, busiest = re.search(r"served (\d+) requests; .* sent (\d+) within", line).groups()
    assert served == "3" and 1 <= int(busiest) <= 3 and "source, 127.0.0.1," in line


def test_a_superlink_busy_database_is_answered_503_to_retry_other_500s_pass(gate):
    """Flower's SuperLink answers 500 'database is locked' under load, and a SuperNode drops
    a message on a 500; the gate turns exactly that one into 503 + Retry-After (retried)."""
    base, proc = gate
    status, headers, body = post(f"{base}/v1/fleet/push-messages", b"x",
                                 {"x-test-error": "sqlite3.OperationalError: database is locked"})
    assert status == 503 and headers["retry-after"] == "1" and b"busy" in body
    status, _, body = post(f"{base}/v1/fleet/push-messages", b"x",
                           {"x-test-error": "KeyError: run 7"})
    assert (status, body) == (500, b"KeyError: run 7")
