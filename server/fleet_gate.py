"""The public face of `fedlora server`: only the Fleet API reaches the SuperLink from outside.

Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (submit, list and
stop runs, register node keys) and the Runtime API (what the ServerApp calls) on one HTTP
port, and the open-source edition has no accounts: anyone who reaches that port, including a
participant's node, can run code on the server and on every node. So `fedlora server` puts the
SuperLink on 127.0.0.1 and this gate on the public address. The gate terminates TLS with the
server's certificate and forwards, unchanged (headers included, so node authentication still
verifies), exactly the Fleet requests a Flower 1.41 SuperNode sends (`FLEET_ROUTES`) plus
`GET /health`. Anything else is answered 404 with the reason, and logged with who asked.

Run as `python -m server.fleet_gate --listen HOST:PORT --upstream 127.0.0.1:PORT ...`; built on
uvicorn (the ASGI server Flower's SuperLink itself uses) and httpx.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn

# Exactly the requests of flwr 1.41's SuperNode (flwr/supernode/fleet_http_client.py).
FLEET_ROUTES = frozenset(("POST", f"/v1/fleet/{name}") for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
OPEN_ROUTES = FLEET_ROUTES | {("GET", "/health")}
MAX_BODY_BYTES = 32 * 2**20  # Flower sends arrays in chunks of at most 5 MiB
UPSTREAM_TIMEOUT_S = 300.0
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarding itself sets again.
DROPPED_HEADERS = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                             b"trailer", b"transfer-encoding", b"upgrade", b"host",
                             b"content-length"))
REFUSAL = ("fedlora server: this address serves only the Fleet API that client nodes use; "
           "submitting, listing or stopping runs and registering node keys work only on the "
           "server machine itself (its Control API listens on 127.0.0.1)")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_open(method: str, path: str) -> bool:
    """Whether the gate forwards this request (an exact route match: no prefixes, no '..')."""
    return (method, path) in OPEN_ROUTES


def log(message: str) -> None:
    """One line on stderr (the server's fleet-gate.log)."""
    print(f"[fedlora fleet gate] {message}", file=sys.stderr, flush=True)


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON error answer."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds MAX_BODY_BYTES."""
    chunks, size, more = [], 0, True
    while more:
        event = await receive()
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        more = event.get("more_body", False)
    return b"".join(chunks)


class FleetGate:
    """ASGI app: forward the open routes to the upstream SuperLink, refuse the rest."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool) -> None:
        """`upstream` is the SuperLink's base URL on loopback."""
        self.upstream = upstream
        self.verify = verify
        self.client: httpx.AsyncClient | None = None

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
                # identity encoding: the bytes forwarded are the bytes the SuperLink sent
                self.client = httpx.AsyncClient(base_url=self.upstream, verify=self.verify,
                                                timeout=UPSTREAM_TIMEOUT_S,
                                                headers={"accept-encoding": "identity"})
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward or refuse one request."""
        method, path = scope["method"], scope["path"]
        host, port = scope.get("client") or ("?", "?")
        peer = f"{host}:{port}"
        if not is_open(method, path):
            log(f"refused {method} {path} from {peer}: not a Fleet API request")
            await _answer(send, 404, REFUSAL)
            return
        body = await _read_body(receive)
        if body is None:
            log(f"refused {method} {path} from {peer}: body over {MAX_BODY_BYTES} bytes")
            await _answer(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() not in DROPPED_HEADERS and k.lower() != b"accept-encoding"]
        assert self.client is not None
        try:
            query = scope.get("query_string", b"").decode("latin-1")
            reply = await self.client.request(method, f"{path}?{query}" if query else path,
                                              content=body, headers=headers)
        except httpx.HTTPError as exc:
            log(f"the SuperLink did not answer {method} {path}: {exc!r}")
            await _answer(send, 502, "fedlora server: the SuperLink behind the gate did not "
                                     "answer; it may be restarting")
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
               if k.lower().encode("latin-1") not in DROPPED_HEADERS]
        out.append((b"content-length", str(len(reply.content)).encode()))
        await send({"type": "http.response.start", "status": reply.status_code,
                    "headers": out})
        await send({"type": "http.response.body", "body": reply.content})


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM."""
    args = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    scheme = "https" if args.ca_file else "http"
    gate = FleetGate(f"{scheme}://{args.upstream}", upstream_verify(args.ca_file))
    log(f"forwarding the Fleet API from {args.listen} to the SuperLink on {args.upstream}; "
        "everything else is refused")
    uvicorn.run(gate, host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile,
                ssl_keyfile=args.keyfile, log_level="warning", access_log=False,
                lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
