"""A federation under load: 16 client nodes, each a host of its own (a network namespace with
its own address on 10.87.0.0/24), against a `fedlora server` whose only public face is the
fleet gate (the SuperLink listens on 127.0.0.1 of the server host, so every request of every
node went through the gate), with TLS, node authentication (16 authorised keys) and a resident
ClientApp worker per node, on tiny-llama.

Rounds 1 and 2: all 16 nodes reply and are merged. Round 3: three nodes are SIGKILLed (power
cut of their host) after the server sent training and before their replies left (they hold
them: tests/hold_reply); the round merges the 13 others (min-replies=13) and names the three.
The nodes start 4 at a time (each imports torch twice; 16 at once starved the 2 cores for
minutes, see docs/benchmarks.md) and poll every 3 s (each poll writes to the SuperLink's
SQLite database, whose "database is locked" answers, a 500, lose messages under load); the
memory of the 16 node hosts is printed (13.5 GiB RSS, 9.6 GiB PSS measured). And a reply of
579 MB travels the same path, bitwise equal.

Needs root and `ip netns` (skipped otherwise, with the reason). Every namespace and every
process in it is removed by the fixture, by name and PID, also when a test fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from netns_hosts import NET, Hosts, made, says
from test_deployment import final_adapter_loads, wait_for

from fedlora.outputs import read_metrics, training_rounds

pytestmark = [pytest.mark.slow, pytest.mark.load]

NODES = [f"node-{i:02d}" for i in range(1, 17)]
HOSTS = {"server": 1, **{name: 10 + i for i, name in enumerate(NODES, 1)}}
SERVER = f"{NET}.1:9092"
KILLED = NODES[-3:]
ROUND_TIMEOUT = 120
STARTING = 4  # nodes started at once
POLL_S = 3  # each poll is a write to the SuperLink's SQLite: 16 a second at 1 s lost messages


@pytest.fixture(scope="module")
def fleet():
    """The server host and 16 node hosts on one bridge; all of it removed afterwards."""
    with made(HOSTS) as net:
        yield net


@pytest.fixture
def fleet_procs(fleet, tmp_path):
    """No process left on any host after a test; the end of the server's log and of one
    node's is printed (pytest shows it when the test failed)."""
    try:
        yield fleet
    finally:
        fleet.stop()
        for log in (tmp_path / "server.log", tmp_path / f"{NODES[0]}.log",
                    tmp_path / f"{KILLED[0]}.log"):
            if log.exists():
                print(f"---- {log.name} (last 4000 characters) ----\n{log.read_text()[-4000:]}")
    assert all(not fleet.pids(name) for name in fleet.hosts)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """`fedlora certs` for the server's address and the 16 nodes."""
    from fedlora.cli.main import main

    out = tmp_path_factory.mktemp("certs")
    assert main(["certs", "--out", str(out), "--host", f"{NET}.1", "--nodes", *NODES]) == 0
    return out


def memory_mib(hosts: Hosts, names: list[str]) -> dict[str, tuple[int, float, float]]:
    """Processes, resident memory and proportional set size (shared pages split between the
    processes that map them: what the machine really spends) in MiB of the processes on
    hosts `names`, summed by the program each runs (`clients.worker`, ...)."""
    import psutil

    total: dict[str, tuple[int, float, float]] = {}
    for name in names:
        for pid in hosts.pids(name):
            try:
                proc = psutil.Process(pid)
                program, info = program_of(proc.cmdline()), proc.memory_full_info()
            except psutil.Error:  # exited meanwhile
                continue
            count, rss, pss = total.get(program, (0, 0.0, 0.0))
            total[program] = (count + 1, rss + info.rss / 2**20, pss + info.pss / 2**20)
    return total


def program_of(argv: list[str]) -> str:
    """What a process runs: `clients.worker` for `python -P -m clients.worker ...`, `fedlora`
    for `python -m fedlora.cli.main client ...`, `flwr-serverapp` for a console script."""
    if not argv:
        return "?"
    if "-c" in argv[:-1]:  # fedlora client's check of its node config
        return "python -c"
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1].removesuffix(".cli.main")
    script = next((a for a in argv[1:] if not a.startswith("-")), argv[0])
    return Path(script).name


def test_sixteen_nodes_every_round_completes_and_three_killed_mid_round_lose_nothing(
        fleet_procs, certs, tmp_path):
    hosts, out, log = fleet_procs, tmp_path / "out", tmp_path / "server.log"
    server = hosts.fedlora("server", [
        "server", "--address", SERVER, "--certs-dir", str(certs), "--authorized-keys",
        *(str(certs / f"{name}.pub") for name in NODES), "--output-dir", str(out),
        "--min-nodes", str(len(NODES)), "--model", "tiny-llama", "--rounds", "3",
        "--local-steps", "1", "--run-config",
        f"lr=0.01 dataset-size=320 batch-size=2 max-length=64 fraction-evaluate=0.0 "
        f"round-timeout={ROUND_TIMEOUT} min-train-nodes=13 min-replies=13"], log)
    wait_for(says(log, "registered SuperNode key", len(NODES)), server, log)
    held = {name: tmp_path / f"{name}.held" for name in KILLED}
    hold = os.pathsep.join([str(Path(__file__).parent / "hold_reply"),
                            os.environ.get("PYTHONPATH", "")])
    for i, name in enumerate(NODES):
        env = {"PYTHONPATH": hold, "FEDLORA_TEST_HOLD_AT_TRAIN": "3",
               "FEDLORA_TEST_HELD": str(held[name])} if name in held else None
        hosts.fedlora(name, [
            "client", "--server", SERVER, "--root-certificates", str(certs / "ca.crt"),
            "--auth-key", str(certs / name), "--name", name, "--partition-id", str(i),
            "--num-partitions", str(len(NODES)), "--poll-interval", str(POLL_S)],
            tmp_path / f"{name}.log", env=env)
        if i % STARTING == STARTING - 1:  # a few at a time: 16 imports of torch at once
            for started in NODES[i + 1 - STARTING:i + 1]:  # starve the 2 cores for minutes
                wait_for(says(tmp_path / f"{started}.log", "ClientApp worker ready"), server,
                         log)
    wait_for(says(log, "round 2: sent training"), server, log, timeout=600)
    memory = memory_mib(hosts, NODES)  # every node has loaded its model and trained round 1
    print("16 node hosts, by program: (processes, RSS MiB, PSS MiB):",
          {k: (n, round(rss), round(pss)) for k, (n, rss, pss) in sorted(memory.items())},
          "total RSS", round(sum(v[1] for v in memory.values())), "MiB, PSS",
          round(sum(v[2] for v in memory.values())), "MiB")
    # round 3: the three hold their replies; their hosts lose power mid-round
    wait_for(lambda: all(path.exists() for path in held.values()), server, log)
    assert "round 3: sent training to 16 nodes" in log.read_text()
    for name in KILLED:
        hosts.kill_host(name)
    assert server.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = training_rounds(read_metrics(out))
    assert [row["round"] for row in rows] == [1, 2, 3]  # every round completed, once
    assert all(row["failed-attempts"] == [] for row in rows)
    for row in rows:  # each node merged or named with its reason: nothing lost unsaid
        merged = [c["node-name"] for c in row["clients"]]
        failed = [f["node-name"] for f in row["failures"]]
        assert sorted(merged + failed) == NODES, row
    # rounds 1 and 2 merge at least min-replies: every node, unless the SuperLink lost one's
    # message (on this loaded 2-core machine: SQLite "database is locked", docs/benchmarks.md),
    # which the round then names above
    assert all(row["clients-replied"] >= 13 for row in rows[:2]), rows[:2]
    for row in rows[:2]:
        if row["failures"]:
            print(f"round {row['round']}: {row['clients-replied']} merged; failed:",
                  [(f["node-name"], f["reason"]) for f in row["failures"]])
    cut = rows[2]  # round 3: the 13 living nodes merged, the 3 dead ones named
    assert sorted(c["node-name"] for c in cut["clients"]) == NODES[:13]
    assert sorted(f["node-name"] for f in cut["failures"]) == KILLED
    # given up on by the round timeout, or by the SuperLink once their heartbeats stopped
    reasons = {f["reason"] for f in cut["failures"]}
    assert reasons <= {f"no reply within round-timeout={ROUND_TIMEOUT} s",
                       NODE_UNAVAILABLE_ERROR_REASON}, reasons
    final_adapter_loads(out)


# ---- a reply of over 500 MB through the gate and the SuperLink ----

WIDE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 6,
        "num_attention_heads": 8, "num_key_value_heads": 8}
WIDE_RANK = 1024  # LoRA on all 7 linear layers of 6: 6 x 1024 x (11 x 1024 + 3 x 4096) x 4 B


def wide_llama(folder: Path) -> Path:
    """A Llama-shaped model with random weights, wide enough that a rank-1024 LoRA reply on
    all its linear layers is 579 MB in float32 (its base weights: 400 MB), and the byte
    tokenizer of tiny-llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.models.builtin import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(**WIDE, vocab_size=320, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class PeakMemory:
    """The peak resident memory (VmHWM) of every process seen on some hosts, sampled from
    /proc every 0.2 s in a thread until `stop`."""

    def __init__(self, hosts: Hosts, names: list[str]) -> None:
        import threading

        self.hosts, self.names, self.peak = hosts, names, {}  # pid -> (program, MiB)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for name in self.names:
                for pid in self.hosts.pids(name):
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    except OSError:  # exited meanwhile
                        continue
                    kib = next((int(line.split()[1]) for line in status.splitlines()
                                if line.startswith("VmHWM:")), 0)
                    self.peak[pid] = (program_of([a.decode() for a in argv if a]), kib / 1024)

    def stop(self) -> dict[str, float]:
        """The largest peak of one process, by program (MiB)."""
        self.done.set()
        self.thread.join()
        by_program: dict[str, float] = {}
        for program, mib in self.peak.values():
            by_program[program] = max(by_program.get(program, 0.0), mib)
        return by_program


def test_a_reply_of_over_500_mb_arrives_bitwise_equal_through_the_gate(fleet_procs, certs,
                                                                       tmp_path):
    """One node trains a rank-1024 LoRA on a wide synthetic Llama (one step) and sends 579 MB
    of factors through its SuperNode, the fleet gate (default limits: Flower sends 5 MiB
    chunks) and the SuperLink; the ServerApp reads exactly the bytes the node's worker built
    (tests/hash_arrays logs a hash on both sides), and the node exactly what the server sent.
    Prints the transfer times and the peak memory of the server's processes."""
    import json

    hosts, out, log = fleet_procs, tmp_path / "out", tmp_path / "server.log"
    model, hashes = wide_llama(tmp_path / "wide-llama"), tmp_path / "arrays.jsonl"
    hook = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "hash_arrays"),
                                           os.environ.get("PYTHONPATH", "")]),
            "FEDLORA_TEST_ARRAYS": str(hashes)}
    node = NODES[0]
    peaks = PeakMemory(hosts, ["server", node])
    server = hosts.fedlora("server", [
        "server", "--address", SERVER, "--certs-dir", str(certs), "--authorized-keys",
        str(certs / f"{node}.pub"), "--output-dir", str(out), "--min-nodes", "1",
        "--model", str(model), "--rank", str(WIDE_RANK), "--rounds", "1", "--local-steps", "1",
        "--run-config", "lr=0.001 dataset-size=40 batch-size=1 max-length=32 "
        "fraction-evaluate=0.0 round-timeout=900 min-train-nodes=1 min-replies=1"], log,
        env=hook)
    wait_for(says(log, "registered SuperNode key"), server, log)
    hosts.fedlora(node, ["client", "--server", SERVER, "--root-certificates",
                         str(certs / "ca.crt"), "--auth-key", str(certs / node), "--name", node,
                         "--node-config", f"model={model}"],  # a run may not name a path
                  tmp_path / f"{node}.log", env=hook)
    try:
        assert server.wait(timeout=1200) == 0, log.read_text()[-3000:]
    finally:
        peak = peaks.stop()
    [row] = training_rounds(read_metrics(out))
    assert row["clients-replied"] == 1 and row["failures"] == []
    lines = [json.loads(line) for line in hashes.read_text().splitlines()]
    calls = {(line["side"], line["call"]): line for line in lines if line["bytes"] >= 500e6}
    up = calls["node", "to"], calls["server", "from"]  # the reply
    down = calls["server", "to"], calls["node", "from"]  # the global adapter sent for it
    assert up[0]["bytes"] == row["clients"][0]["bytes-up"] >= 500e6
    assert up[0]["sha256"] == up[1]["sha256"] and up[0]["bytes"] == up[1]["bytes"]
    assert down[0]["sha256"] == down[1]["sha256"]
    print(f"reply {up[0]['bytes'] / 1e6:.1f} MB: node built -> ServerApp read "
          f"{up[1]['time'] - up[0]['time']:.1f} s; global adapter {down[0]['bytes'] / 1e6:.1f} "
          f"MB: ServerApp built -> node read {down[1]['time'] - down[0]['time']:.1f} s; "
          f"round {row['seconds']:.1f} s; peak RSS MiB by program: "
          f"{ {k: round(v) for k, v in sorted(peak.items())} }")
