"""The fleet gate under abuse: its memory and an honest node's latency, with and without abuse.

A gate process (server/fleet_gate.py, default limits) stands in front of a fake SuperLink on
127.0.0.1 that reads each body piece by piece and answers 200. For each gate (this tree's,
and with --old REV the gate of that git revision, e.g. the one that held whole bodies) two
phases of --seconds each run one after the other:

- quiet: one honest node (source 127.0.0.2) sends a small pull-messages-like POST every
  0.1 s on a keep-alive connection, as a SuperNode does (more often, to have samples);
- abuse: the same honest node, plus, from 127.0.0.1 (another source, no key): --bodies
  clients each sending 31 MiB bodies to /v1/fleet/push-object back to back and --slow
  connections that send a header line a second and never finish their headers (reopened
  when closed); and from 127.0.0.3 one connection sending refused /v1/control/start-run
  requests as fast as it can.

Measured per phase: the gate's peak RSS (psutil, sampled every 10 ms), the honest requests'
median and 95th-percentile latency and how many succeeded, the abusive bodies forwarded and
refused, slow connections the gate closed, and the bytes the gate logged per second. The
abuse/quiet ratios are printed at the end. Everything started is stopped by PID.

    python benchmarks/gate_abuse.py                      # this tree's gate
    python benchmarks/gate_abuse.py --old f7d7b6d~1      # and the gate before streaming
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
from common import MIB, print_table

ROOT = Path(__file__).resolve().parent.parent
BODY = 31 * MIB


class FakeSuperLink(BaseHTTPRequestHandler):
    """Reads the body in 64 KiB pieces (keeping none of it) and answers 200."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        left = int(self.headers.get("content-length", 0))
        while left:
            piece = self.rfile.read(min(left, 2**16))
            if not piece:
                return
            left -= len(piece)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    """Return once 127.0.0.1:port accepts connections (at most 60 s, while `proc` runs)."""
    for _ in range(600):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the gate did not start; see {log}")


@contextmanager
def gate_process(script: list[str], upstream_port: int, log: Path):
    """A gate on a free port, logging to `log`; stopped by PID afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *script, "--listen", f"127.0.0.1:{port}",
                                 "--upstream", f"127.0.0.1:{upstream_port}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_listening(port, proc, log)
            yield port, proc
        finally:  # SIGTERM, SIGKILL after 30 s
            proc.terminate()
            for late in psutil.wait_procs([psutil.Process(proc.pid)], timeout=30)[1]:
                late.kill()
            proc.wait()


def honest(port: int, stop: threading.Event, latencies: list[float], failures: list[str]):
    """A node polling every 0.1 s from 127.0.0.2 on one keep-alive connection."""
    conn = None
    while not stop.is_set():
        start = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                                  source_address=("127.0.0.2", 0))
            conn.request("POST", "/v1/fleet/pull-messages", body=b"n" * 200)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures.append(str(resp.status))
        except (OSError, http.client.HTTPException) as exc:
            failures.append(type(exc).__name__)
            conn = None
        stop.wait(0.1)


def body_sender(port: int, stop: threading.Event, body: bytes, counts: dict):
    """Sends 31 MiB bodies back to back on fresh connections; counts the answers."""
    head = (b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head)
                sock.sendall(body)
                status = sock.recv(64).split(b" ")[1].decode()
        except (OSError, IndexError) as exc:
            status = type(exc).__name__
        counts[status] = counts.get(status, 0) + 1


def slow_headers(port: int, stop: threading.Event, n: int, counts: dict):
    """Keeps `n` connections sending a header line a second, never the blank line."""
    def opened() -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\n")
            sock.setblocking(False)  # closed() peeks without waiting
            return sock
        except OSError:
            return None

    def closed(sock: socket.socket | None) -> bool:
        if sock is None:
            return True
        try:
            return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # open, nothing to read
        except OSError:
            return True

    socks = [opened() for _ in range(n)]
    while not stop.wait(1.0):
        for i, sock in enumerate(socks):
            try:
                if closed(sock):
                    raise ConnectionError
                assert sock is not None
                sock.sendall(b"x-slow: 1\r\n")
            except (OSError, AssertionError):
                counts["closed"] = counts.get("closed", 0) + 1
                if sock is not None:
                    sock.close()
                socks[i] = opened()
    for sock in socks:
        if sock is not None:
            sock.close()


def refused_flood(port: int, stop: threading.Event, counts: dict):
    """One keep-alive connection from 127.0.0.3 sending refused requests at full speed."""
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                                  source_address=("127.0.0.3", 0))
            conn.request("POST", "/v1/control/start-run", body=b"fab")
            resp = conn.getresponse()
            resp.read()
            counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            conn = None


def phase(port: int, proc: subprocess.Popen, log: Path, seconds: float, abuse: bool,
          args: argparse.Namespace) -> dict:
    """One phase: the numbers of the module docstring."""
    stop, latencies, failures = threading.Event(), [], []
    bodies, slow, refused = {}, {}, {}
    threads = [threading.Thread(target=honest, args=(port, stop, latencies, failures))]
    if abuse:
        body = b"\0" * BODY
        threads += [threading.Thread(target=body_sender, args=(port, stop, body, bodies))
                    for _ in range(args.bodies)]
        threads.append(threading.Thread(target=slow_headers,
                                        args=(port, stop, args.slow, slow)))
        threads.append(threading.Thread(target=refused_flood, args=(port, stop, refused)))
    gate = psutil.Process(proc.pid)
    rss_before, log_before = gate.memory_info().rss, log.stat().st_size
    peak = rss_before
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, gate.memory_info().rss)
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    time.sleep(0.5)
    latencies.sort()
    return {"rss_before": rss_before / MIB, "rss_peak": peak / MIB,
            "rss_after": gate.memory_info().rss / MIB,
            "p50": statistics.median(latencies) * 1e3 if latencies else float("nan"),
            "p95": latencies[int(0.95 * (len(latencies) - 1))] * 1e3 if latencies
            else float("nan"),
            "honest": f"{len(latencies)}/{len(latencies) + len(failures)}",
            "bodies": bodies, "slow_closed": slow.get("closed", 0), "refused": refused,
            "log_kib_s": (log.stat().st_size - log_before) / 1024 / seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--bodies", type=int, default=8, help="clients sending 31 MiB bodies")
    p.add_argument("--slow", type=int, default=50, help="slow-header connections")
    p.add_argument("--old", metavar="REV", help="also measure the gate of this git revision")
    args = p.parse_args()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), FakeSuperLink)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gates = [("this tree", ["-m", "server.fleet_gate"])]
    tmp = Path(tempfile.mkdtemp(prefix="gate-abuse-"))
    if args.old:
        old = tmp / "old_fleet_gate.py"
        old.write_text(subprocess.run(["git", "show", f"{args.old}:server/fleet_gate.py"],
                                      cwd=ROOT, check=True, capture_output=True,
                                      text=True).stdout)
        gates.append((f"at {args.old}", [str(old)]))
    rows, ratios = [], []
    try:
        for name, script in gates:
            log = tmp / f"gate-{len(rows)}.log"
            with gate_process(script, upstream.server_address[1], log) as (port, proc):
                quiet = phase(port, proc, log, args.seconds, False, args)
                loud = phase(port, proc, log, args.seconds, True, args)
            for label, r in (("quiet", quiet), ("abuse", loud)):
                rows.append([name, label, f"{r['rss_before']:.0f}", f"{r['rss_peak']:.0f}",
                             f"{r['rss_after']:.0f}", f"{r['p50']:.1f}", f"{r['p95']:.1f}",
                             r["honest"], " ".join(f"{k}:{v}" for k, v in
                                                   sorted(r["bodies"].items())) or "-",
                             r["slow_closed"], " ".join(f"{k}:{v}" for k, v in
                                                        sorted(r["refused"].items())) or "-",
                             f"{r['log_kib_s']:.1f}"])
            ratios.append((name, loud["rss_peak"] / quiet["rss_peak"], loud["p50"] / quiet["p50"],
                           loud["p95"] / quiet["p95"]))
    finally:
        upstream.shutdown()
        upstream.server_close()
    print(f"{os.cpu_count()} CPU cores, load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.seconds:g} s a phase, "
          f"{args.bodies} body senders x {BODY // MIB} MiB, {args.slow} slow connections")
    print_table(["gate", "phase", "RSS start MiB", "RSS peak MiB", "RSS end MiB",
                 "honest p50 ms", "honest p95 ms", "honest ok", "31 MiB bodies (status:n)",
                 "slow closed", "refused flood (status:n)", "log KiB/s"], rows)
    for name, rss, p50, p95 in ratios:
        print(f"{name}: abuse/quiet peak RSS {rss:.2f}x, honest p50 {p50:.2f}x, "
              f"p95 {p95:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
