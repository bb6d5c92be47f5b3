"""The public face of `fedlora server`: only the Fleet API reaches the SuperLink from outside.

Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (submit, list and
stop runs, register node keys) and the Runtime API (what the ServerApp calls) on one HTTP
port, and the open-source edition has no accounts: anyone who reaches that port, including a
participant's node, can run code on the server and on every node. So `fedlora server` puts the
SuperLink on 127.0.0.1 and this gate on the public address. The gate terminates TLS with the
server's certificate and forwards, unchanged (headers included, so node authentication still
verifies), exactly the Fleet requests a Flower 1.41 SuperNode sends (`FLEET_ROUTES`) plus
`GET /health`. Anything else is answered 404 with the reason, and logged with who asked.

Whoever reaches the address can talk to the gate before any node authentication (the
SuperLink checks the signature), so the gate holds under abuse by itself:

- bodies are streamed to the SuperLink and answers streamed back, piece by piece, so the
  gate's memory does not grow with body size; a body must declare its Content-Length, at most
  --max-body-bytes, or it is refused (411/413) before it is read;
- at most --max-requests requests are in the gate at once, at most --max-requests-per-source
  from one source (an IPv4 address, an IPv6 /64), and a source gets --rate-per-source
  requests per second with bursts of --burst-per-source; past these the answer is 503 with
  Retry-After (503, not 429: a Flower 1.41 SuperNode retries 502/503/504 and gives up on any
  other status, and honest nodes behind one NAT share a source);
- one source holds at most --max-connections-per-source open connections; a connection that
  has not sent a request's headers --header-timeout seconds after it opened (or after the
  first byte of its next request) is closed, and a body that stalls for --body-timeout
  seconds is answered 408;
- each source gets at most --log-lines-per-source log lines per --log-interval seconds, then
  one "suppressed K lines from SOURCE" line.

Run as `python -m server.fleet_gate --listen HOST:PORT --upstream 127.0.0.1:PORT ...`; built on
uvicorn (the ASGI server Flower's SuperLink itself uses) and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import math
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # httpx and uvicorn load when the gate runs, not when `fedlora` reads flags
    import httpx

# Exactly the requests of flwr 1.41's SuperNode (flwr/supernode/fleet_http_client.py).
FLEET_ROUTES = frozenset(("POST", f"/v1/fleet/{name}") for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
OPEN_ROUTES = FLEET_ROUTES | {("GET", "/health")}
MAX_BODY_BYTES = 32 * 2**20  # Flower sends arrays in chunks of at most 5 MiB
UPSTREAM_TIMEOUT_S = 300.0
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarding itself sets again.
HOP_HEADERS = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"trailer", b"transfer-encoding", b"upgrade", b"host"))
REFUSAL = ("fedlora server: this address serves only the Fleet API that client nodes use; "
           "submitting, listing or stopping runs and registering node keys work only on the "
           "server machine itself (its Control API listens on 127.0.0.1)")
CLOSE = (b"connection", b"close")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class GateLimits:
    """What one source, and everyone together, may ask of the gate (flags of the same name).

    The defaults leave room for 50 SuperNodes behind one NAT address: an idle Flower 1.41
    node polls pull-messages every 3 s and sends a heartbeat every 30 s (about 0.4 requests
    per second), and while it moves a message it has at most 2 object pushes or pulls in
    flight; a burst past the rate only makes the nodes retry after the Retry-After."""

    max_requests: int = 512
    max_requests_per_source: int = 128
    max_connections_per_source: int = 256
    rate_per_source: float = 100.0
    burst_per_source: int = 1000
    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    log_lines_per_source: int = 20
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        check_limits(dataclasses.asdict(self))


def check_limits(values: dict[str, Any], prefix: str = "") -> None:
    """A ValueError naming the flag (--PREFIX<field>) of the first limit that is not above 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"--{flag_name(name, prefix)}: expected a number above 0, got "
                             f"{value!r}")


LIMIT_HELP = {
    "max_requests": "requests in the gate at once, all sources together",
    "max_requests_per_source": "requests in the gate at once from one source (an IPv4 "
                               "address or an IPv6 /64)",
    "max_connections_per_source": "open connections from one source; more are closed at once",
    "rate_per_source": "requests per second one source may send, on average",
    "burst_per_source": "requests one source may send at once above that rate",
    "max_body_bytes": "largest request body (Flower's largest is one 5 MiB array chunk)",
    "header_timeout": "seconds a connection may take to send a request's headers",
    "body_timeout": "seconds a request body may stall before the request is answered 408",
    "log_lines_per_source": "log lines per source per --log-interval; the rest are counted",
    "log_interval": "seconds of the log rate limit's window",
}


def flag_name(field: str, prefix: str = "") -> str:
    """The command-line flag (without dashes) for a GateLimits field."""
    return prefix + field.replace("_", "-")


def add_limit_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                        prefix: str = "") -> None:
    """The GateLimits flags, each named --PREFIX<field> (`fedlora server` passes 'gate-')."""
    defaults = GateLimits()
    for field in dataclasses.fields(GateLimits):
        default = getattr(defaults, field.name)
        p.add_argument(f"--{flag_name(field.name, prefix)}", type=type(default),
                       default=default, metavar="N", dest=f"{prefix}{field.name}",
                       help=f"{LIMIT_HELP[field.name]} (default {default})")


def limits_from_args(args: argparse.Namespace, prefix: str = "") -> GateLimits:
    """The GateLimits the flags of add_limit_arguments ask for."""
    values = {f.name: getattr(args, f"{prefix}{f.name}") for f in dataclasses.fields(GateLimits)}
    check_limits(values, prefix)
    return GateLimits(**values)


def limit_argv(limits: GateLimits) -> list[str]:
    """`python -m server.fleet_gate` flags for the limits that differ from the defaults."""
    defaults, out = GateLimits(), []
    for field in dataclasses.fields(GateLimits):
        value = getattr(limits, field.name)
        if value != getattr(defaults, field.name):
            out += [f"--{flag_name(field.name)}", str(value)]
    return out


def source_of(host: str) -> str:
    """Who a peer address counts as: the IPv4 address, or the /64 of an IPv6 address (one
    host gets a whole /64, so its addresses are one source)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class TokenBuckets:
    """Per-key token buckets: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        """An empty table: a key seen for the first time starts with a full bucket."""
        self.rate, self.burst = rate, float(burst)
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at time)
        self.prune_at = 1024

    def take(self, key: str, now: float) -> float:
        """Take one token for `key` at time `now`: 0.0 if it had one, else the seconds until
        it will have one (and nothing is taken)."""
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens - 1.0, now)
        if len(self.buckets) > self.prune_at:
            self.prune(now)
        return 0.0

    def prune(self, now: float) -> None:
        """Forget the keys whose bucket is full again (they start full when next seen), so
        many sources cannot grow the table without bound."""
        refill = self.burst / self.rate
        self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < refill}
        self.prune_at = max(1024, 2 * len(self.buckets))


class LogLimiter:
    """At most `lines` log lines per key per `interval` seconds; the rest are counted and
    reported as one "suppressed" line when the key's window ends."""

    def __init__(self, lines: int, interval: float) -> None:
        """No windows open yet."""
        self.lines, self.interval = lines, interval
        self.windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, lines, dropped)

    def admit(self, key: str, message: str, now: float) -> list[str]:
        """The lines to print for `message` from `key` at time `now` (a summary of the
        window that ended, if any, and the message unless it is over the limit)."""
        out = self._close(key, now) if key in self.windows else []
        start, shown, dropped = self.windows.get(key, (now, 0, 0))
        if shown < self.lines:
            self.windows[key] = (start, shown + 1, dropped)
            out.append(message)
        else:
            self.windows[key] = (start, shown, dropped + 1)
        return out

    def flush(self, now: float, everything: bool = False) -> list[str]:
        """Summaries of the windows that have ended (all of them with `everything`); those
        windows are forgotten."""
        out: list[str] = []
        for key in list(self.windows):
            out += self._close(key, math.inf if everything else now)
        return out

    def _close(self, key: str, now: float) -> list[str]:
        """End `key`'s window if it is over: its summary line, if it dropped any."""
        start, _, dropped = self.windows[key]
        if now - start < self.interval:
            return []
        del self.windows[key]
        if not dropped:
            return []
        return [f"suppressed {dropped} lines from {key} in {self.interval:g} s (at most "
                f"{self.lines} per source)"]


def is_open(method: str, path: str) -> bool:
    """Whether the gate forwards this request (an exact route match: no prefixes, no '..')."""
    return (method, path) in OPEN_ROUTES


def log(message: str) -> None:
    """One line on stderr (the server's fleet-gate.log)."""
    print(f"[fedlora fleet gate] {message}", file=sys.stderr, flush=True)


async def _answer(send: Send, status: int, detail: str,
                  extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A JSON error answer (with `extra` headers, e.g. Retry-After or Connection: close)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class Refused(Exception):
    """A request body the gate stopped reading: the status and reason to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        """`status` 0 means the client went away: nobody to answer."""
        super().__init__(detail)
        self.status, self.detail = status, detail


class Upload:
    """A request body, read from the client piece by piece as the SuperLink takes it."""

    def __init__(self, receive: Receive, limit: int, timeout: float) -> None:
        """At most `limit` bytes; each piece must come within `timeout` seconds."""
        self.receive, self.limit, self.timeout = receive, limit, timeout
        self.size = 0
        self.refused: Refused | None = None

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's pieces; raises (and keeps in .refused) a Refused when it stalls, runs
        past the limit or the client disconnects."""
        more = True
        while more:
            try:
                event = await asyncio.wait_for(self.receive(), self.timeout)
            except TimeoutError:
                self.refused = Refused(408, f"no part of the request body arrived for "
                                            f"{self.timeout:g} s; send it without pauses")
                raise self.refused from None
            if event["type"] == "http.disconnect":
                self.refused = Refused(0, "the client disconnected during the body")
                raise self.refused
            piece = event.get("body", b"")
            self.size += len(piece)
            if self.size > self.limit:
                self.refused = Refused(413, f"request body over {self.limit} bytes")
                raise self.refused
            if piece:
                yield piece
            more = event.get("more_body", False)


class FleetGate:
    """ASGI app: forward the open routes to the upstream SuperLink, refuse the rest."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool,
                 limits: GateLimits | None = None) -> None:
        """`upstream` is the SuperLink's base URL on loopback."""
        self.upstream = upstream
        self.verify = verify
        self.limits = limits or GateLimits()
        self.client: httpx.AsyncClient | None = None
        self.active = 0  # requests in the gate
        self.active_by_source: dict[str, int] = {}
        self.connections: dict[str, int] = {}  # open connections by source
        self.buckets = TokenBuckets(self.limits.rate_per_source, self.limits.burst_per_source)
        self.logs = LogLimiter(self.limits.log_lines_per_source, self.limits.log_interval)
        self.flusher: asyncio.Task[None] | None = None
        self.served = 0  # requests seen, and the most one source sent within one second
        self.seconds: dict[str, tuple[int, int]] = {}  # source -> (second, requests in it)
        self.busiest: tuple[int, str] = (0, "")

    def count(self, source: str, now: float) -> None:
        """Count a request from `source` for the busiest-second figure logged at shutdown."""
        self.served += 1
        second, n = self.seconds.get(source, (int(now), 0))
        n = n + 1 if second == int(now) else 1
        self.seconds[source] = (int(now), n)
        self.busiest = max(self.busiest, (n, source))
        if len(self.seconds) > 1024:
            self.seconds = {k: v for k, v in self.seconds.items() if v[0] == int(now)}

    def note(self, source: str, message: str) -> None:
        """Log `message` about `source`, within the source's log rate."""
        for line in self.logs.admit(source, message, time.monotonic()):
            log(line)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI event."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the upstream connection pool at start, close it at shutdown."""
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                import httpx

                # identity encoding: the bytes forwarded are the bytes the SuperLink sent
                n = self.limits.max_requests
                self.client = httpx.AsyncClient(
                    base_url=self.upstream, verify=self.verify, timeout=UPSTREAM_TIMEOUT_S,
                    headers={"accept-encoding": "identity"},
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
                self.flusher = asyncio.create_task(self._flush_logs())
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.flusher is not None:
                    self.flusher.cancel()
                for line in self.logs.flush(time.monotonic(), everything=True):
                    log(line)
                log(f"served {self.served} requests; the busiest source, {self.busiest[1] or '-'}"
                    f", sent {self.busiest[0]} within one second")
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_logs(self) -> None:
        """Print the summaries of ended log windows, once per interval."""
        while True:
            await asyncio.sleep(self.limits.log_interval)
            for line in self.logs.flush(time.monotonic()):
                log(line)

    def _busy(self, source: str) -> str | None:
        """Why a request from `source` cannot enter now, or None (then it has entered)."""
        held = self.active_by_source.get(source, 0)
        if held >= self.limits.max_requests_per_source:
            return f"{held} requests from {source} in the gate, the most one source may have"
        if self.active >= self.limits.max_requests:
            return f"{self.active} requests in the gate, the most it takes at once"
        self.active += 1
        self.active_by_source[source] = held + 1
        return None

    def _leave(self, source: str) -> None:
        """A request from `source` has left the gate."""
        self.active -= 1
        held = self.active_by_source.pop(source) - 1
        if held:
            self.active_by_source[source] = held

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward or refuse one request."""
        method, path = scope["method"], scope["path"]
        host, port = scope.get("client") or ("?", "?")
        peer, source = f"{host}:{port}", source_of(str(host))
        now = time.monotonic()
        self.count(source, now)
        wait = self.buckets.take(source, now)
        if wait:
            self.note(source, f"refused {method} {path} from {peer}: over "
                              f"{self.limits.rate_per_source:g} requests a second")
            await _answer(send, 503, f"too many requests from {source}; retry after the "
                                     f"Retry-After seconds",
                          ((b"retry-after", str(math.ceil(wait)).encode()), CLOSE))
            return
        if not is_open(method, path):
            self.note(source, f"refused {method} {path} from {peer}: not a Fleet API request")
            await _answer(send, 404, REFUSAL)
            return
        busy = self._busy(source)
        if busy is not None:
            self.note(source, f"refused {method} {path} from {peer}: {busy}")
            await _answer(send, 503, f"fedlora server: busy ({busy}); retry after the "
                                     f"Retry-After seconds", ((b"retry-after", b"1"), CLOSE))
            return
        try:
            await self._forward(scope, receive, send, peer, source)
        finally:
            self._leave(source)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, peer: str,
                       source: str) -> None:
        """Stream the request to the SuperLink and its answer back."""
        import httpx

        method, path = scope["method"], scope["path"]
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() not in HOP_HEADERS and k.lower() != b"accept-encoding"]
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"])
        declared = int(lengths[0]) if lengths and lengths[0].isdigit() else None
        refusal = None
        if chunked or len(lengths) > 1 or (lengths and declared is None):
            refusal = Refused(411, "send the request body with one Content-Length (no "
                                   "chunked transfer encoding), as a Flower SuperNode does")
        elif declared is not None and declared > self.limits.max_body_bytes:
            refusal = Refused(413, f"request body of {declared} bytes is over "
                                   f"{self.limits.max_body_bytes} bytes")
        upload = Upload(receive, self.limits.max_body_bytes, self.limits.body_timeout)
        query = scope.get("query_string", b"").decode("latin-1")
        assert self.client is not None
        reply = None
        if refusal is None:
            request = self.client.build_request(
                method, f"{path}?{query}" if query else path, headers=headers,
                content=upload.pieces() if declared else None)
            try:
                reply = await self.client.send(request, stream=True)
            except Exception as exc:  # the upload's own refusal or the SuperLink's failure
                if upload.refused is None and not isinstance(exc, httpx.HTTPError):
                    raise
                refusal = upload.refused
                if refusal is None:
                    self.note("superlink", f"the SuperLink did not answer {method} {path} "
                                           f"from {peer}: {exc!r}")
                    await _answer(send, 502, "fedlora server: the SuperLink behind the gate "
                                             "did not answer; it may be restarting")
                    return
        if reply is None:
            assert refusal is not None
            if refusal.status:
                self.note(source, f"refused {method} {path} from {peer}: {refusal.detail}")
                await _answer(send, refusal.status, refusal.detail, (CLOSE,))
            return
        if reply.status_code == 500:
            await self.failed(reply, send, method, path, peer)
            return
        try:
            out = [(k, v) for k, v in reply.headers.raw if k.lower() not in HOP_HEADERS]
            await send({"type": "http.response.start", "status": reply.status_code,
                        "headers": out})
            async for piece in reply.aiter_raw():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await reply.aclose()


    async def failed(self, reply: httpx.Response, send: Send, method: str, path: str,
                     peer: str) -> None:
        """Answer a SuperLink 500 whose body says its database was locked (Flower's SQLite
        state under load: a 5 s busy timeout) with 503 and Retry-After, which a Flower
        SuperNode retries (it gives up on a 500: the message would be lost); nothing was
        written, so the retry is safe. Any other 500 is passed on unchanged (its body, small,
        read here)."""
        body = await reply.aread()
        await reply.aclose()
        if BUSY in body.lower():
            self.note("superlink", f"the SuperLink's database was locked for {method} {path} "
                                   f"from {peer}: answered 503, the node retries")
            await _answer(send, 503, "fedlora server: the SuperLink was busy (its database "
                                     "was locked); retry", ((b"retry-after", b"1"),))
            return
        out = [(k, v) for k, v in reply.headers.raw
               if k.lower() not in HOP_HEADERS and k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 500,
                    "headers": [*out, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


BUSY = b"database is locked"  # what a SuperLink's 500 says when SQLite timed out


def gate_protocol(gate: FleetGate) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the gate's connection limits: at most
    max_connections_per_source open connections from a source, and a header timeout."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = gate.limits

    class GateProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        """One connection; closed when over its source's share or slow to send headers."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            """Count the connection, or close it when its source holds too many."""
            super().connection_made(transport)
            self.header_timer: asyncio.TimerHandle | None = None
            host, port = self.client or ("?", "?")
            self.peer, self.source = f"{host}:{port}", source_of(str(host))
            held = gate.connections.get(self.source, 0)
            self.counted = held < limits.max_connections_per_source
            if not self.counted:
                gate.note(self.source, f"closed a connection from {self.peer}: {held} open "
                                       f"from {self.source}, the most one source may have")
                self.transport.close()
                return
            gate.connections[self.source] = held + 1
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            """Between requests, the first byte starts the next request's header clock."""
            if self.header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self.arm_header_timer()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            """Uncount the connection."""
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            if self.counted:
                self.counted = False
                held = gate.connections.pop(self.source) - 1
                if held:
                    gate.connections[self.source] = held
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            """Close the connection unless a new request's headers are complete in time."""
            waiting = self.cycle  # a new request replaces it once its headers are in

            def expire() -> None:
                self.header_timer = None
                if self.cycle is waiting and not self.transport.is_closing():
                    gate.note(self.source, f"closed a connection from {self.peer}: no "
                                           f"complete request headers in "
                                           f"{limits.header_timeout:g} s")
                    self.transport.close()

            self.header_timer = self.loop.call_later(limits.header_timeout, expire)

    return GateProtocol


def upstream_verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """How to check the SuperLink's certificate: against our CA, on loopback (so without
    a host-name check: the certificate names the public address)."""
    if ca_file is None:
        return False  # plain HTTP upstream: nothing to verify
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    return context


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The gate's flags."""
    p = argparse.ArgumentParser(prog="python -m server.fleet_gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="public address")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT",
                   help="the SuperLink's loopback address")
    p.add_argument("--certfile", help="server certificate (TLS on --listen)")
    p.add_argument("--keyfile", help="server private key")
    p.add_argument("--ca-file", help="CA that signed the SuperLink's certificate (TLS upstream)")
    add_limit_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM."""
    import uvicorn

    args = parse_args(argv)
    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        print(f"python -m server.fleet_gate: {exc}", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    scheme = "https" if args.ca_file else "http"
    gate = FleetGate(f"{scheme}://{args.upstream}", upstream_verify(args.ca_file), limits)
    log(f"forwarding the Fleet API from {args.listen} to the SuperLink on {args.upstream}; "
        "everything else is refused")
    # log level "error": uvicorn's own per-request warnings ("Invalid HTTP request") are not
    # rate-limited, so a source could fill the log with them
    uvicorn.run(gate, host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile,
                ssl_keyfile=args.keyfile, log_level="error", access_log=False,
                lifespan="on", http=gate_protocol(gate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
