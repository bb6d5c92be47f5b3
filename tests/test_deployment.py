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
from flower_cli import FlowerCli, app_pyproject, hostile_app, said
from peft import PeftModel
from test_simulation import SESSION_ENV, leftover_processes

from fedlora.adapters import peft_method
from fedlora.adapters.virtual_tokens import causal_logits
from fedlora.config import ModelSettings, Settings
from fedlora.models import load_model
from fedlora.outputs import read_metrics, training_rounds

RUN = ["--model", "tiny-llama", "--rounds", "2", "--local-steps", "3", "--run-config",
       "lr=0.01 dataset-size=120 eval-examples=8"]


def free_port() -> int:
    """A local port free now, below the kernel's ephemeral range: the nodes a test starts
    pick their own ports by binding port 0, which hands out ports of that range, and could
    be handed the one chosen here before the server binds it (a CI run failed so: the
    SuperLink's "address already in use")."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(min(20000, low // 2), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {low}")


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A `fedlora ...` process logging to a file (stopped by the test, by PID)."""
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli.main", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **SESSION_ENV, "PYTHONUNBUFFERED": "1"})


def insecure_nodes(port: int, count: int, logs: Path) -> list[subprocess.Popen]:
    """`count` plain-HTTP `fedlora client` nodes, each on its share of the built-in data."""
    return [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--partition-id",
                   str(i), "--num-partitions", str(count)], logs / f"node{i}.log")
            for i in range(count)]


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
    loaded = PeftModel.from_pretrained(base, str(out / "final"))
    tuned = causal_logits(loaded, ids, torch.ones_like(ids))  # a soft prompt's positions dropped
    assert tuned.shape == plain.shape and not torch.allclose(plain, tuned, atol=1e-4)


@pytest.mark.slow
def test_server_and_three_nodes_with_different_ranks(tmp_path):
    port, out = free_port(), tmp_path / "out"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "3",
                    "--strategy", "flexlora", "--client-ranks", "4,8,16",
                    "--output-dir", str(out), *RUN], tmp_path / "server.log")
    # each node's own --rank, not the server's client-ranks cycle (which would give 4, 8, 16)
    ranks = {0: 16, 1: 4, 2: 8}
    # site-2 runs Flower's own process per message; the others the resident worker
    isolation = {0: "resident", 1: "resident", 2: "subprocess"}
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--rank", str(r),
                    "--partition-id", str(i), "--num-partitions", "3", "--name", f"site-{i}",
                    "--isolation", isolation[i]], tmp_path / f"node{i}.log")
             for i, r in ranks.items()]
    try:
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    rows = training_rounds(rows)
    for row in rows:
        assert row["clients-replied"] == 3 and row["clients-failed"] == 0, row["failures"]
        assert {c["partition-id"]: c["lora-rank"] for c in row["clients"]} == ranks
        assert {c["partition-id"]: c["node-name"] for c in row["clients"]} == {
            i: f"site-{i}" for i in ranks}
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 16
    final_adapter_loads(out)
    # the base model: loaded once per resident node, once per train/evaluate message else
    model_loads = [(tmp_path / f"node{i}.log").read_text().count("] base model tiny-llama "
                                                                "loaded") for i in ranks]
    assert model_loads == [1, 1, 5]  # round 0 evaluate + 2 rounds x (train + evaluate)
    assert wait_gone() == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "ia3", "prompt-tuning", "p-tuning",
                                    "prefix-tuning", "p-tuning-v2", "adapter", "lora-moe"])
def test_a_peft_method_in_a_deployment_and_a_node_of_another_method_refused(method, tmp_path):
    """Two nodes train the server's PEFT method; a third, configured for LoRA, refuses every
    message with the reason (from the first, the rank query), and never reaches the merge."""
    port, out = free_port(), tmp_path / "out"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "3",
                    "--peft", method, "--output-dir", str(out),
                    *(["--strategy", "lora-moe"] if method == "lora-moe" else []), *RUN[:-1],
                    RUN[-1] + " min-train-nodes=3 min-replies=2 lr=0.05" + (
                        " num-virtual-tokens=4" if "num-virtual-tokens" in
                        peft_method(method).Options.keys() else "")],
                   tmp_path / "server.log")
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--partition-id",
                    str(i), "--num-partitions", "3", "--name", f"site-{i}",
                    *(["--node-config", 'peft="lora"'] if i == 2 else [])],
                   tmp_path / f"node{i}.log") for i in range(3)]
    try:
        # finished, degraded: the refusing node also fails every evaluation (EXIT_DEGRADED)
        assert server.wait(timeout=600) == 3, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes])
    for row in read_metrics(out):  # round 0 too
        [refused] = row["eval-failures"]
        assert f"configured for peft=lora, but the run trains peft={method}" in (
            refused["reason"])
    rows = training_rounds(read_metrics(out))
    for row in rows:
        assert sorted(c["node-name"] for c in row["clients"]) == ["site-0", "site-1"]
        # refused at its first message (the rank query), so it never named itself
        assert len(row["failures"]) == 1
        assert f"configured for peft=lora, but the run trains peft={method}" in (
            row["failures"][0]["reason"])
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_method(method).config(Settings().lora).peft_type
    final_adapter_loads(out)
    assert wait_gone() == []


@pytest.mark.slow
def test_dpo_in_a_deployment_on_the_nodes_own_pairs_one_node_with_two_processes(tmp_path):
    """objective=dpo across real nodes: each reads its own preference pairs (--data-path);
    site-0 trains with two data-parallel processes (--devices cpu:2). The held-out margin
    grows from 0 and the final adapter loads."""
    from test_dpo import write_pairs

    port, out = free_port(), tmp_path / "out"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "2",
                    "--output-dir", str(out), "--model", "tiny-llama", "--rounds", "2",
                    "--local-steps", "4", "--run-config",
                    "objective=dpo dpo-beta=0.5 lr=0.01 lora-rank=4 batch-size=4 "
                    "max-length=64 eval-examples=12"], tmp_path / "server.log")
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--name",
                    f"site-{i}", "--data-path",
                    write_pairs(tmp_path / f"pairs-{i}.jsonl", n=60, seed=i),
                    *(["--devices", "cpu:2"] if i == 0 else [])], tmp_path / f"node{i}.log")
             for i in range(2)]
    try:
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes])
    rows = read_metrics(out)
    assert rows[0]["pref-margin"] == pytest.approx(0.0, abs=1e-6) and rows[0]["pref-pairs"] > 0
    trained = training_rounds(rows)
    assert [r["clients-replied"] for r in trained] == [2, 2]
    assert 0 < trained[0]["pref-margin"] < trained[1]["pref-margin"]
    assert "data parallel: 2 processes" in (tmp_path / "node0.log").read_text()
    final_adapter_loads(out)
    assert wait_gone() == []


@pytest.mark.slow
def test_tls_node_authentication_and_a_control_api_closed_to_participants(tmp_path):
    """TLS and node authentication refuse an unregistered node; on the public address the
    Flower CLI can neither list, submit nor stop runs nor register a key; on the server
    machine's control port it can, and a run whose bundle carries code is refused by every
    node before any of that code runs."""
    certs, port, out = tmp_path / "certs", free_port(), tmp_path / "out"
    from fedlora.cli.main import main

    assert main(["certs", "--out", str(certs), "--host", "127.0.0.1",
                 "--nodes", "node0", "node1", "intruder"]) == 0
    server = start(["server", "--address", f"127.0.0.1:{port}", "--control-port",
                    str(control := free_port()), "--min-nodes", "2",
                    "--certs-dir", str(certs), "--authorized-keys", str(certs / "node0.pub"),
                    str(certs / "node1.pub"), "--output-dir", str(out), *RUN],
                   tmp_path / "server.log")
    tls = ["--server", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt")]
    deadline = time.monotonic() + 120
    while "Successfully started run" not in (tmp_path / "server.log").read_text():
        assert time.monotonic() < deadline and server.poll() is None, "run never submitted"
        time.sleep(0.5)
    assert (tmp_path / "server.log").read_text().count("registered SuperNode key") == 2
    nodes = [start(["client", *tls, "--auth-key", str(certs / name), "--partition-id", str(i),
                    "--num-partitions", "2"], tmp_path / f"{name}.log")
             for i, name in enumerate(("node0", "node1"))]
    intruder = start(["client", *tls, "--auth-key", str(certs / "intruder")],
                     tmp_path / "intruder.log")
    public = FlowerCli(tmp_path / "participant", f"127.0.0.1:{port}", certs / "ca.crt")
    operator = FlowerCli(tmp_path / "operator", f"127.0.0.1:{control}", certs / "ca.crt")
    marker, report = tmp_path / "marker", tmp_path / "report.json"
    app = hostile_app(tmp_path / "hostile", marker, report, nodes=2)
    try:
        [run] = operator.runs()  # the operator sees the fedlora run from the server machine
        for args in (["ls", "target"], ["supernode", "register", str(certs / "intruder.pub"),
                                        "target"],
                     ["stop", str(run["run-id"]), "target"], ["run", str(app), "target"]):
            proc = public(*args)
            assert proc.returncode != 0 and "serves only the Fleet API" in said(proc), args
        submitted = operator("run", str(app), "target", "--stream", timeout=300)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        reasons = json.loads(report.read_text())
        assert len(reasons) == 2 and all("carries files of its own" in r for r in reasons)
        assert not marker.exists()
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop([server, *nodes, intruder])
    # its key is not registered: refused at each try (it keeps trying for about 70 s)
    assert "Exit Code: 305" in (tmp_path / "intruder.log").read_text()
    assert "fedlora: the server refused this node" in (tmp_path / "intruder.log").read_text()
    rows = training_rounds(read_metrics(out))
    assert [r["clients-replied"] for r in rows] == [2, 2]
    assert "refused POST /v1/control/" in (out / "fleet-gate.log").read_text()
    final_adapter_loads(out)
    assert wait_gone() == []


PROBE_SERVERAPP = """\
import json
import time
from pathlib import Path
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes = []
    while len(nodes) < 2:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    content = RecordDict({"config": ConfigRecord({"rank": 8, "server-round": 1,
                                                 "init-seed": 0}), "arrays": ArrayRecord()})
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=n, message_type="train") for n in nodes], timeout=240)
    with Path(REPORT).open("a") as fh:
        fh.write(json.dumps({"config": dict(context.run_config), "replies": [
            r.error.reason if r.has_error() else "trained" if all(
                isinstance(x, (int, float)) for v in r.content.metric_records["metrics"].values()
                for x in (v if isinstance(v, list) else [v])  # per-step losses: a list
            ) else "metrics with text" for r in replies]}) + "\\n")
"""


def probe_app(folder: Path, report: Path) -> tuple[Path, Path]:
    """(an app bundle folder holding only pyproject.toml, which names the test's own
    ServerApp `leak_probe:app` and fedlora's ClientApp, the folder holding leak_probe.py,
    which the server's processes import through PYTHONPATH)."""
    bundle, module = folder / "bundle", folder / "module"
    bundle.mkdir(parents=True)
    module.mkdir()
    (module / "leak_probe.py").write_text(f"REPORT = {str(report)!r}\n" + PROBE_SERVERAPP)
    (bundle / "pyproject.toml").write_text(app_pyproject(
        "probe", "leak_probe:app", "clients.client_app:app",
        # every key a crafted run config overrides must have a default here (Flower's rule)
        'model = "tiny-llama"\ndevice = "cpu"\nlocal-steps = 1\ndataset = "builtin:units"\n'
        'dataset-size = 60\nfield-map = ""\nmax-length = 256\ntruncation = "left"'),
        encoding="utf-8")
    return bundle, module


@pytest.mark.slow
def test_crafted_run_configs_get_replies_without_a_nodes_data(tmp_path):
    """fedlora issue 31: the run configs that made a node reveal a record of its private file,
    a file of a folder the server named, or whether a path exists, sent by a ServerApp of
    the test's own to real nodes (site-a with --data-path, resident worker; site-b without,
    Flower's process per message): no reply holds the planted text or a path, and a path that
    exists gets the very reply of one that does not. A run on which both nodes fail with
    their own data gets the generic reason from the resident worker and from Flower's
    process alike."""
    secret = "PLANTED-SECRET Compute 51 + 16"
    data = tmp_path / "site-a.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{secret} ({i})", "output": "67"}) +
                            "\n" for i in range(12)), encoding="utf-8")
    folder = tmp_path / "private-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("API_KEY=sk-live-PLANTED\n", encoding="utf-8")
    report = tmp_path / "report.jsonl"
    bundle, module = probe_app(tmp_path / "probe", report)
    crafted = ['field-map="messages=instruction"',
               f'dataset="hf:{folder}" field-map="messages=text"',
               f'dataset="hf:{tmp_path / "missing"}" field-map="messages=text"',
               f'model="{folder}"', f'model="{tmp_path / "missing"}"',
               # every answer cut off: each node fails on its own data, generically
               'max-length=8 truncation="right"']
    port, control, out = free_port(), free_port(), tmp_path / "out"
    env = {**os.environ, **SESSION_ENV, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(module),
                                                       os.environ.get("PYTHONPATH")]))}
    # the server's own run waits for a third node, so it sends nothing and stays up
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli.main", "server", "--address", f"127.0.0.1:{port}",
         "--control-port", str(control), "--min-nodes", "3", "--output-dir", str(out),
         "--model", "tiny-llama", "--rounds", "1", "--local-steps", "1", "--run-config",
         "dataset-size=60 fraction-evaluate=0"],
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, env=env)
    nodes = [start(["client", "--server", f"127.0.0.1:{port}", "--insecure", "--name", name,
                    *extra], tmp_path / f"{name}.log")
             for name, extra in (("site-a", ["--data-path", str(data)]),
                                 ("site-b", ["--isolation", "subprocess"]))]
    operator = FlowerCli(tmp_path / "operator", f"127.0.0.1:{control}", None)
    operator.env["PYTHONPATH"] = env["PYTHONPATH"]  # `flwr run` imports the app's components
    try:
        deadline = time.monotonic() + 180
        while "Successfully started run" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() < deadline and server.poll() is None, "run never started"
            time.sleep(0.5)
        for config in crafted:
            proc = operator("run", str(bundle), "target", "--run-config", config, "--stream",
                            timeout=400)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        stop([server, *nodes])
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == len(crafted)
    for row in rows:
        assert len(row["replies"]) == 2
        for reply in row["replies"]:
            for leak in (secret, "Compute", "sk-live", str(data), str(tmp_path), "site-a.jsonl",
                         "notes.txt"):
                assert leak not in reply, (row["config"], reply)
    replies = [sorted(r["replies"]) for r in rows]
    assert replies[0] == ["trained", "trained"]  # site-a read its own file its own way
    assert replies[1] == replies[2] and replies[3] == replies[4]  # exists or not: alike
    assert any("a run config may not name paths on a node" in r for r in replies[1])
    assert any("a run config may not name paths on a node" in r for r in replies[3])
    assert all("could not read its data" in r and "error id" in r for r in replies[5])
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


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    import psutil

    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [pid]


def sigkill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a fedlora process with everything it started (a crash of its machine)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll `predicate()` every 0.2 s while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def training_started(log: Path, server_round: int):
    """True once the server log shows round `server_round`'s training messages were sent."""
    return lambda: f"round {server_round}: sent" in log.read_text()


@pytest.mark.slow
def test_node_killed_mid_round_is_skipped_and_a_node_that_comes_back_takes_part(tmp_path):
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "3",
                    "--output-dir", str(out), *RUN[:-2], "--run-config",
                    "lr=0.01 dataset-size=120 fraction-evaluate=0.0 round-timeout=90"], log)
    node = lambda i: start(["client", "--server", f"127.0.0.1:{port}", "--insecure",
                            "--partition-id", str(i), "--num-partitions", "3",
                            "--local-steps", "20"], tmp_path / f"node{i}-{time.time()}.log")
    nodes = [node(i) for i in range(3)]
    try:
        wait_for(training_started(log, 1), server, log)
        sigkill_tree(nodes[2])  # mid-round: its reply for round 1 never comes
        nodes.append(node(2))  # the same data comes back as a new node
        assert server.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        stop([server, *nodes])
    first, second = training_rounds(read_metrics(out))
    assert first["clients-replied"] == 2 and first["clients-failed"] >= 1
    assert sorted(c["partition-id"] for c in first["clients"]) == [0, 1]
    assert sorted(c["partition-id"] for c in second["clients"]) == [0, 1, 2]  # back again
    final_adapter_loads(out)
    assert wait_gone() == []


def relative_difference(a: Path, b: Path) -> float:
    """max over tensors of ||a - b|| / ||a|| between two adapters' safetensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(
        str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).norm() / x[k].norm().clamp_min(1e-12)) for k in x)


def delta_w_difference(a: Path, b: Path) -> float:
    """max over modules of ||dW_a - dW_b|| / ||dW_a|| with dW = B A: the adapters as
    functions (a factored merge may split the same product into other factors when the
    replies arrive in another order)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(
        str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    worst = 0.0
    for key in (k for k in x if "lora_A" in k):
        up = key.replace("lora_A", "lora_B")
        dx, dy = x[up] @ x[key], y[up] @ y[key]
        worst = max(worst, float((dx - dy).norm() / dx.norm().clamp_min(1e-12)))
    return worst


@pytest.mark.slow
def test_server_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path):
    settings = ["--model", "tiny-llama", "--rounds", "3", "--local-steps", "3",
                "--strategy", "fedavg", "--run-config",
                "lr=0.01 dataset-size=120 fraction-evaluate=0.0 server-optimizer=fedadam"]
    reference = tmp_path / "reference"
    from fedlora.cli.main import main

    assert main(["simulate", "--num-clients", "2", "--output-dir", str(reference),
                 *settings]) == 0
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    address = ["--address", f"127.0.0.1:{port}"]
    server = start(["server", *address, "--min-nodes", "2", "--output-dir", str(out),
                    *settings], log)
    nodes = insecure_nodes(port, 2, tmp_path)
    try:
        wait_for(training_started(log, 2), server, log)
        sigkill_tree(server)  # in the middle of round 2
        # fraction-evaluate=0: no round 0; round 2 may have just ended (a round takes about
        # a second, the log is polled every 0.2 s), then the kill came in round 3
        assert [r["round"] for r in read_metrics(out)] in ([1], [1, 2])
        log2 = tmp_path / "resumed.log"
        resumed = start(["server", *address, "--resume", str(out)], log2)
        try:
            assert resumed.wait(timeout=600) == 0, log2.read_text()[-3000:]
        finally:
            stop([resumed])
    finally:
        stop([server, *nodes])
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]
    assert relative_difference(reference / "final", out / "final") <= 1e-6
    for i in range(2):  # each node's worker served both runs with the model loaded once
        node_log = (tmp_path / f"node{i}.log").read_text()
        assert node_log.count("] base model tiny-llama loaded") == 1, node_log[-3000:]
        assert "a new run" in node_log
    assert wait_gone() == []


def test_a_key_already_registered_by_the_kept_state_database_is_not_an_error(tmp_path, capsys):
    """A resumed server registers its --authorized-keys again; the SuperLink answers that a key
    kept in its database is already in use, which is fine. Any other refusal stays an error.
    (`flwr` is replaced by a script that answers as Flower 1.41 does.)"""
    from fedlora.runtime import node_keys
    from fedlora.runtime.superlink import SimulationSetupError, _register_keys

    flwr = tmp_path / "flwr"
    flwr.write_text("#!/bin/sh\ncase \"$3\" in\n*kept*) echo 'Public key already in use. "
                    "[code: 23]'; exit 1;;\n*bad*) echo 'Invalid public key'; exit 1;;\nesac\n"
                    "echo 'SuperNode 42 registered successfully.'\n")
    flwr.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    node_keys.record(out, 7, "kept")  # what the first run of this server kept
    _register_keys(tmp_path, dict(os.environ), tmp_path, [tmp_path / "new.pub",
                                                         tmp_path / "kept.pub"], out)
    err = capsys.readouterr().err
    assert "registered SuperNode key" in err and "new.pub as node 42" in err
    assert "kept.pub is already registered (kept in the state database) as node 7" in err
    assert node_keys.read(out) == {7: "kept", 42: "new"}
    with pytest.raises(SimulationSetupError, match="could not register SuperNode key .*bad.pub"):
        _register_keys(tmp_path, dict(os.environ), tmp_path, [tmp_path / "bad.pub"], out)


@pytest.mark.slow
def test_nodes_register_again_with_a_server_that_lost_its_state_database(tmp_path):
    """The server dies and a new one starts afresh on the same address (no --resume: a new
    superlink.db); the running nodes notice that it does not know them and join it."""
    port = free_port()
    address = ["--address", f"127.0.0.1:{port}", "--min-nodes", "2"]
    settings = ["--model", "tiny-llama", "--local-steps", "2", "--run-config",
                "lr=0.01 dataset-size=60 fraction-evaluate=0.0"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(["server", *address, "--rounds", "20", "--output-dir", str(tmp_path / "a"),
                   *settings], first_log)
    nodes = insecure_nodes(port, 2, tmp_path)
    try:
        wait_for(lambda: (tmp_path / "a" / "metrics.jsonl").exists(), first, first_log)
        sigkill_tree(first)
        second = start(["server", *address, "--rounds", "1", "--output-dir",
                        str(tmp_path / "b"), *settings], second_log)
        try:
            assert second.wait(timeout=300) == 0, second_log.read_text()[-3000:]
        finally:
            stop([second])
    finally:
        stop([first, *nodes])
    assert training_rounds(read_metrics(tmp_path / "b"))[0]["clients-replied"] == 2
    for i in (0, 1):
        assert "the server no longer knows this node" in (tmp_path / f"node{i}.log").read_text()
    assert wait_gone() == []
