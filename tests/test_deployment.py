"""Real deployment on 127.0.0.1: `fedlora server` (a Flower SuperLink + the ServerApp) and
`fedlora client` nodes (Flower SuperNodes) as separate processes, tiny-llama, 2 rounds.
Every process a test starts is stopped by that test, by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora.config import ModelSettings
from fedlora.models import load_model
from fedlora.outputs import read_metrics
from test_simulation import SESSION_ENV, leftover_processes

RUN = ["--model", "tiny-llama", "--rounds", "2", "--local-steps", "3", "--run-config",
       "lr=0.01 dataset-size=120 eval-examples=8"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A `fedlora ...` process logging to a file (stopped by the test, by PID)."""
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli.main", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **SESSION_ENV, "PYTHONUNBUFFERED": "1"})


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process (fedlora stops its SuperLink/SuperNode children), then reap."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_gone(timeout: float = 30.0) -> list[int]:
    """PIDs of tagged Flower processes still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def final_adapter_loads(out: Path) -> None:
    """The server's final adapter loads with PEFT and changes the base model's logits."""
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    ids = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
    plain = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out / "final"))(input_ids=ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)


def test_server_and_three_nodes_with_different_ranks(tmp_path):
    port, out = free_port(), tmp_path / "out"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "3",
                    "--strategy", "flexlora", "--client-ranks", "4,8,16",
                    "--output-dir", str(out), *RUN], tmp_path / "server.log")
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--rank", str(r),
                    "--partition-id", str(i), "--num-partitions", "3"], tmp_path / f"node{i}.log")
             for i, r in enumerate((4, 8, 16))]
    try:
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients-replied"] == 3 and row["clients-failed"] == 0, row["failures"]
        assert sorted(c["lora-rank"] for c in row["clients"]) == [4, 8, 16]
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 16
    final_adapter_loads(out)
    assert wait_gone() == []


def test_tls_and_node_authentication_refuse_an_unregistered_node(tmp_path):
    certs, port, out = tmp_path / "certs", free_port(), tmp_path / "out"
    from fedlora.cli.main import main

    assert main(["certs", "--out", str(certs), "--host", "127.0.0.1",
                 "--nodes", "node0", "node1", "intruder"]) == 0
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "2",
                    "--certs-dir", str(certs), "--authorized-keys", str(certs / "node0.pub"),
                    str(certs / "node1.pub"), "--output-dir", str(out), *RUN],
                   tmp_path / "server.log")
    tls = ["--server", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt")]
    deadline = time.monotonic() + 120
    while (tmp_path / "server.log").read_text().count("registered SuperNode key") < 2:
        assert time.monotonic() < deadline and server.poll() is None, "keys never registered"
        time.sleep(0.5)
    nodes = [start(["client", *tls, "--auth-key", str(certs / name), "--partition-id", str(i),
                    "--num-partitions", "2"], tmp_path / f"{name}.log")
             for i, name in enumerate(("node0", "node1"))]
    intruder = start(["client", *tls, "--auth-key", str(certs / "intruder")],
                     tmp_path / "intruder.log")
    try:
        assert intruder.wait(timeout=180) != 0  # refused (3 tries): its key is not registered
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes, intruder])
    assert "(Flower exit code 305): the server refused this node" in (
        tmp_path / "intruder.log").read_text()
    rows = read_metrics(out)
    assert [r["clients-replied"] for r in rows] == [2, 2]
    final_adapter_loads(out)
    assert wait_gone() == []


@pytest.mark.parametrize("args, message", [
    (["--address", "0.0.0.0:9999"], "reachable from other machines, but no --certs-dir"),
    (["--address", "nonsense"], "--address: expected HOST:PORT"),
    (["--authorized-keys", "x.pub"], "--authorized-keys needs --certs-dir"),
    (["--certs-dir", "/nonexistent"], "missing /nonexistent/ca.crt"),
])
def test_server_refuses_unsafe_or_wrong_settings_before_starting(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "server", "--model",
                           "tiny-llama", "--output-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--data-path", "/nonexistent.jsonl", "--insecure"], "/nonexistent.jsonl does not exist"),
    ([], "pass --root-certificates CA_CRT"),
    (["--insecure", "--rank", "0"], "'lora-rank': expected an integer >= 1"),
    (["--insecure", "--partition-id", "1"], "--partition-id and --num-partitions go together"),
])
def test_client_refuses_wrong_settings_before_connecting(args, message):
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "client", "--server",
                           "127.0.0.1:9", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
