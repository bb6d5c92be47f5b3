"""Deployment across hosts, as docs/deployment.md says to run it: the server and each client
node in a network namespace of its own (its own address on 10.87.0.0/24, joined by a bridge in
a namespace of its own), TLS and node authentication, nodes with their own data files and
ranks, a participant trying the Flower CLI against the server, a node whose link is cut
mid-round, and the server SIGKILLed mid-round and resumed with node authentication still on.

Needs root and `ip netns` (skipped otherwise, with the reason). Every namespace and every
process in it is removed by the fixture, by name and PID, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from flower_cli import hostile_app, said
from netns_hosts import NET, made, says, site_data
from test_deployment import delta_w_difference, final_adapter_loads, wait_for

from fedlora.outputs import read_metrics, training_rounds
from fedlora.runtime import node_keys

pytestmark = pytest.mark.slow

HOSTS = {"server": 1, "site-a": 2, "site-b": 3, "site-c": 4}  # name -> last address byte
SERVER = f"{NET}.1:9092"


@pytest.fixture(scope="module")
def hosts():
    """Four hosts on one bridge; all of it removed afterwards."""
    with made(HOSTS) as net:
        yield net


@pytest.fixture
def host_procs(hosts, tmp_path):
    """Each test leaves no process behind on any host and every cable plugged in (the hosts
    are shared by the module's tests); the end of every log it wrote is printed, which pytest
    shows when the test failed."""
    try:
        yield hosts
    finally:
        hosts.stop()
        for name in hosts.hosts:
            hosts.link(name, up=True)
        for log in sorted(tmp_path.glob("*.log")):
            print(f"---- {log.name} (last 4000 characters) ----\n{log.read_text()[-4000:]}")
    assert all(not hosts.pids(name) for name in hosts.hosts)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """`fedlora certs` for the server's address, two sites and one key nobody authorised."""
    from fedlora.cli.main import main

    out = tmp_path_factory.mktemp("certs")
    assert main(["certs", "--out", str(out), "--host", f"{NET}.1",
                 "--nodes", "site-a", "site-b", "intruder"]) == 0
    return out


def server_args(certs: Path, out: Path, *extra: str) -> list[str]:
    """`fedlora server` on the server host's own address with TLS and node authentication."""
    return ["server", "--address", SERVER, "--certs-dir", str(certs), "--authorized-keys",
            str(certs / "site-a.pub"), str(certs / "site-b.pub"), "--output-dir", str(out),
            *extra]


def client_args(certs: Path, name: str, *extra: str) -> list[str]:
    """`fedlora client` on a site, connecting to the server's address."""
    return ["client", "--server", SERVER, "--root-certificates", str(certs / "ca.crt"),
            "--auth-key", str(certs / name), "--name", name, *extra]


def test_ranks_a_closed_control_api_and_a_cut_link_across_hosts(host_procs, certs, tmp_path):
    hosts, out, log = host_procs, tmp_path / "out", tmp_path / "server.log"
    server = hosts.fedlora("server", server_args(
        certs, out, "--min-nodes", "2", "--model", "tiny-llama", "--rounds", "5",
        "--local-steps", "3", "--strategy", "flexlora", "--client-ranks", "8,32",
        "--run-config", "lr=0.01 eval-examples=8 fraction-evaluate=0.0 round-timeout=40 "
        "min-replies=1"), log)
    wait_for(says(log, "Successfully started run"), server, log)  # `flwr ls` will list it
    assert log.read_text().count("registered SuperNode key") == 2
    ids = re.findall(r"registered SuperNode key \S+ as node (\d+)", log.read_text())
    assert node_keys.read(out) == dict(zip(map(int, ids), ("site-a", "site-b")))
    for name, rank, offset in (("site-a", 8, 1), ("site-b", 32, 5)):
        data = site_data(tmp_path / f"{name}.jsonl", offset)
        hosts.fedlora(name, client_args(certs, name, "--data-path", str(data), "--rank",
                                        str(rank)), tmp_path / f"{name}.log")
    # a participant holding ca.crt, against the server's public address: nothing works
    participant = hosts.flwr("site-a", tmp_path / "participant", SERVER, certs / "ca.crt")
    operator = hosts.flwr("server", tmp_path / "operator", "127.0.0.1:9093", certs / "ca.crt")
    [run] = operator.runs()  # on the server machine, the Control API answers
    for args in (["ls", "target"], ["stop", str(run["run-id"]), "target"],
                 ["supernode", "register", str(certs / "intruder.pub"), "target"],
                 ["run", str(hostile_app(tmp_path / "app", tmp_path / "marker",
                                         tmp_path / "report.json")), "target"]):
        proc = participant(*args)
        assert proc.returncode != 0 and "serves only the Fleet API" in said(proc), args
    # site-b's cable is pulled once round 2 is sent, and plugged back once a round has given
    # up on it: round 2, or round 3 when site-b had already pulled and answered round 2 in the
    # moment before the cable came out (0.2 s of polling against a round of about one second)
    wait_for(says(log, "round 2: sent"), server, log)
    hosts.link("site-b", up=False)
    wait_for(lambda: any(row.get("failures") for row in training_rounds(read_metrics(out))),
             server, log)
    hosts.link("site-b", up=True)
    assert server.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = training_rounds(read_metrics(out))
    ranks = [{c["node-name"]: c["lora-rank"] for c in row["clients"]} for row in rows]
    cut = next(i for i, row in enumerate(rows) if row.get("failures"))
    assert cut in (1, 2), ranks
    assert ranks[:cut + 1] == [{"site-a": 8, "site-b": 32}] * cut + [{"site-a": 8}]
    # back online, site-b takes part again (in the next round, or in the one after when that
    # was sent before its first heartbeat after the cut reached the server)
    assert {"site-a": 8, "site-b": 32} in ranks[cut + 1:]
    # the cable came out before site-b's reply left, or between its reply message and its
    # arrays (Flower pushes them one after the other): either way the round names site-b
    [(name, reason)] = [(f["node-name"], f["reason"]) for f in rows[cut]["failures"]]
    assert name == "site-b" and reason in (
        "no reply within round-timeout=40 s",
        "its reply message arrived but its arrays did not within round-timeout=40 s"), reason
    assert f"(site-b) failed: {reason}" in log.read_text()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 32
    final_adapter_loads(out)


def test_a_node_dead_between_its_reply_message_and_its_arrays_holds_no_round(host_procs,
                                                                              certs, tmp_path):
    """site-b's SuperNode SIGKILLs itself once it has pushed its round-2 reply message and
    before its arrays (tests/die_before_arrays): round 2 still merges site-a's reply, names
    site-b for its missing arrays, and the run goes on."""
    hosts, out, log = host_procs, tmp_path / "out", tmp_path / "server.log"
    server = hosts.fedlora("server", server_args(
        certs, out, "--min-nodes", "2", "--model", "tiny-llama", "--rounds", "3",
        "--local-steps", "3", "--run-config", "lr=0.01 eval-examples=8 fraction-evaluate=0.0 "
        "round-timeout=40 min-replies=1 min-train-nodes=1"), log)
    wait_for(says(log, "registered SuperNode key", 2), server, log)
    died = tmp_path / "site-b.died"
    hook = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "die_before_arrays"),
                                           os.environ.get("PYTHONPATH", "")]),
            "FEDLORA_TEST_DIE_AT_TRAIN": "2", "FEDLORA_TEST_DIED": str(died)}
    for name, offset in (("site-a", 1), ("site-b", 5)):
        data = site_data(tmp_path / f"{name}.jsonl", offset)
        hosts.fedlora(name, client_args(certs, name, "--data-path", str(data)),
                      tmp_path / f"{name}.log", env=hook if name == "site-b" else None)
    assert server.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert died.exists()  # site-b died after pushing a reply message, before its arrays
    rows = training_rounds(read_metrics(out))
    assert [row["round"] for row in rows] == [1, 2, 3]  # the run went on
    reason = "its reply message arrived but its arrays did not within round-timeout=40 s"
    # the round site-b died in (round 2, its second training reply, unless round 1 gave up
    # on it first): site-b named for its arrays, site-a's reply merged
    [cut] = [row for row in rows if any(f["reason"] == reason for f in row["failures"])]
    assert [(f["node-name"], f["reason"]) for f in cut["failures"]] == [("site-b", reason)]
    assert [c["node-name"] for c in cut["clients"]] == ["site-a"]
    assert f"(site-b) failed: {reason}" in log.read_text()
    final_adapter_loads(out)


def test_server_killed_mid_round_resumes_with_node_authentication_on(host_procs, certs,
                                                                     tmp_path):
    settings = ["--model", "tiny-llama", "--rounds", "3", "--local-steps", "3", "--strategy",
                "flexlora", "--client-ranks", "8,32", "--run-config",
                "lr=0.01 dataset-size=120 fraction-evaluate=0.0"]
    from fedlora.cli.main import main

    reference = tmp_path / "reference"
    assert main(["simulate", "--num-clients", "2", "--output-dir", str(reference),
                 *settings]) == 0
    hosts, out, log = host_procs, tmp_path / "out", tmp_path / "server.log"
    server = hosts.fedlora("server", server_args(certs, out, "--min-nodes", "2", *settings),
                           log)
    wait_for(says(log, "registered SuperNode key", 2), server, log)
    # the holder of site-b's key calls itself site-a: it is named by its key
    for i, (name, rank) in enumerate((("site-a", 8), ("site-b", 32))):
        hosts.fedlora(name, client_args(certs, name, "--rank", str(rank), "--partition-id",
                                        str(i), "--num-partitions", "2", "--name", "site-a"),
                      tmp_path / f"{name}.log")
    wait_for(says(log, "round 2: sent"), server, log)
    hosts.kill_host("server")  # mid-round 2: the server machine loses power
    server.wait(timeout=30)
    assert [r["round"] for r in read_metrics(out)] in ([1], [1, 2])  # [1, 2]: in round 3
    log2 = tmp_path / "resumed.log"
    resumed = hosts.fedlora("server", server_args(certs, out, "--resume", str(out)), log2)
    wait_for(says(log2, "SuperNode key", 2), resumed, log2)  # registered, or kept in the db
    intruder_log = tmp_path / "intruder.log"
    hosts.fedlora("site-c", client_args(certs, "intruder"), intruder_log)
    # node authentication survived the resume: the intruder is refused and never takes part
    wait_for(says(intruder_log, "fedlora: the server refused this node"), resumed, log2)
    assert resumed.wait(timeout=600) == 0, log2.read_text()[-3000:]
    for row in training_rounds(read_metrics(out)):
        assert {c["node-name"]: c.get("node-declared-name") for c in row["clients"]} == {
            "site-a": None, "site-b": "site-a"}  # never the intruder, never by its own word
    assert "registered with key 'site-b' but calls itself 'site-a'" in log.read_text()
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]
    assert delta_w_difference(reference / "final", out / "final") <= 1e-6


def test_secure_aggregation_across_hosts_equals_the_plain_simulation(host_procs, certs,
                                                                    tmp_path):
    """secure-aggregation=true between real SuperNodes on separate hosts: the server never
    gets a site's factors, and the merged adapter equals the plain simulation's up to the
    quantisation error; a site that requires secure aggregation takes part. Both sites sign
    their keys with their node keys and accept only keys signed by the other's listed key
    (--secagg-peers): an unsigned or unlisted key would refuse the round."""
    settings = ["--model", "tiny-llama", "--rounds", "2", "--local-steps", "2", "--strategy",
                "fedavg", "--run-config",
                "lr=0.01 dataset-size=120 fraction-evaluate=0.0 client-weights=equal"]
    from fedlora.cli.main import main

    reference = tmp_path / "reference"
    assert main(["simulate", "--num-clients", "2", "--output-dir", str(reference),
                 *settings]) == 0
    hosts, out, log = host_procs, tmp_path / "out", tmp_path / "server.log"
    secure = [*settings[:-1], settings[-1] + " secure-aggregation=true"]
    server = hosts.fedlora("server", server_args(certs, out, "--min-nodes", "2", *secure), log)
    wait_for(says(log, "registered SuperNode key", 2), server, log)
    peers = tmp_path / "consortium.pub"  # the sites' keys, not the intruder's
    peers.write_bytes((certs / "site-a.pub").read_bytes() + (certs / "site-b.pub").read_bytes())
    for i, name in enumerate(("site-a", "site-b")):
        hosts.fedlora(name, client_args(certs, name, "--partition-id", str(i),
                                        "--num-partitions", "2", "--secagg-peers", str(peers),
                                        *(["--require-secure-aggregation"] if i == 0 else [])),
                      tmp_path / f"{name}.log")
    assert server.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = training_rounds(read_metrics(out))
    assert [r["clients-replied"] for r in rows] == [2, 2]
    assert all(r["failures"] == [] and r["failed-attempts"] == [] for r in rows)
    assert log.read_text().count("secure sum of 2 sites") == 2
    assert delta_w_difference(reference / "final", out / "final") <= 1e-5
