"""`fedlora client` tells a TLS mismatch apart from a server that is not up yet, before its
SuperNode starts retrying what cannot succeed (fedlora/cli/client.py: probe_server,
diagnosis). Real sockets on 127.0.0.1, with certificates from `fedlora certs`."""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedlora.cli.client import diagnosis, probe_server, refused_message
from fedlora.cli.main import main


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The server's certificates, and a CA of another federation."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    assert main(["certs", "--out", str(ours), "--host", "127.0.0.1"]) == 0
    assert main(["certs", "--out", str(theirs), "--host", "127.0.0.1"]) == 0
    return ours, theirs


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(params=["tls", "plain"])
def server(request, certs):
    """An HTTP(S) server on a free port: (address, whether it serves TLS)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    if request.param == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs[0] / "server.pem", certs[0] / "server.key")
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}", request.param == "tls"
    httpd.shutdown()
    httpd.server_close()


def test_a_matching_setup_passes(server, certs):
    address, tls = server
    assert probe_server(address, certs[0] / "ca.crt" if tls else None) is None


def test_a_certificate_from_another_ca_is_named_as_a_tls_verification_failure(server, certs):
    address, tls = server
    problem = probe_server(address, certs[1] / "ca.crt")
    if tls:
        assert "TLS verification of the server failed" in problem
        assert "must be the ca.crt" in problem
    else:
        assert "TLS handshake with" in problem and "--insecure" in problem


def test_insecure_against_a_tls_server_says_to_pass_the_ca(server):
    address, tls = server
    problem = probe_server(address, None)
    assert (problem is not None and "its ca.crt with --root-certificates" in problem) == tls


def test_a_server_that_is_not_up_yet_is_left_to_flowers_retries(certs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe_server(f"127.0.0.1:{port}", certs[0] / "ca.crt") is None


@pytest.mark.parametrize("output, retry", [
    ("Exit Code: 305\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", False),
    ("Exit Code: 305\n[code: 2004] Failed to activate SuperNode.", True),
])
def test_a_tls_failure_is_not_retried_but_a_refusal_is(output, retry):
    hint, again = diagnosis(305, output)
    assert again == retry and ("TLS handshake" in hint) != retry


def test_a_refused_node_names_every_cause_and_how_long_it_keeps_trying():
    """It named two causes only, neither of which applies to a key the server never had."""
    first, last = refused_message(1), refused_message(7)
    assert "(1/7)" in first and "for at most 70 s more" in first
    assert "for at most 10 s more" in last
    for cause in ("not registered this node's key yet", "earlier connection",
                  "not in the server's --authorized-keys"):
        assert cause in first
    assert "waiting cannot fix that one" in first and "--auth-key" in first
