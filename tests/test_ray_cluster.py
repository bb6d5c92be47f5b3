"""A simulation on a Ray cluster of two machines, as docs/scaling.md says to run it: a Ray head
in one network namespace (10.87.0.1), a Ray worker in another (10.87.0.2), and
`RAY_ADDRESS=10.87.0.1:6379 fedlora simulate` on the head. The virtual clients must run on both
machines (read from the actors' lines Ray forwards to the driver, which name their machine),
and fedsa-lora's personal B must live on storage both see (the run's personal-dir). Needs root
and `ip netns`; every namespace and process is removed by the fixture."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from netns_hosts import Hosts, netns_unavailable

from fedlora.outputs import read_metrics, training_rounds

pytestmark = pytest.mark.slow

HEAD, WORKER = "10.87.0.1", "10.87.0.2"
ACTOR_STEP = re.compile(
    r"\(ClientAppActor pid=\d+(?:, ip=([\d.]+))?\) client (\d+) round (\d+): step")


@pytest.fixture
def cluster(tmp_path):
    """Two hosts, each running Ray with its own temp dir (short: Ray's socket paths)."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    ray = str(Path(sys.executable).parent / "ray")
    hosts = Hosts({"head": 1, "worker": 2})
    temp = {name: Path(tempfile.mkdtemp(prefix=f"r{name[0]}-", dir="/tmp"))
            for name in ("head", "worker")}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20),
              "--disable-usage-stats", "--block"]
    try:
        hosts.create()
        head = hosts.start("head", [ray, "start", "--head", "--node-ip-address", HEAD, "--port",
                             "6379", "--temp-dir", str(temp["head"]), "--include-dashboard",
                             "false", *common],
                    tmp_path / "ray-head.log")
        wait_for_log(tmp_path / "ray-head.log", "Ray runtime started", head)
        worker = hosts.start("worker", [
            ray, "start", "--address", f"{HEAD}:6379", "--node-ip-address", WORKER,
            "--temp-dir", str(temp["worker"]), *common], tmp_path / "ray-worker.log")
        wait_for_log(tmp_path / "ray-worker.log", "Ray runtime started", worker)
        yield hosts, temp
    finally:
        hosts.destroy()
        for folder in temp.values():
            shutil.rmtree(folder, ignore_errors=True)


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `text` appears in `log`, while `proc` runs."""
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def clients_trained_by_machine(log: Path) -> dict[str, set[tuple[int, int]]]:
    """{machine IP: (client, round) pairs} from the training lines Ray forwarded to the driver
    (prefixed `(ClientAppActor pid=N, ip=IP)`; without `ip=` for actors on the driver's own
    machine, the head)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    trained: dict[str, set[tuple[int, int]]] = {}
    for ip, client, rnd in ACTOR_STEP.findall(text):
        trained.setdefault(ip or HEAD, set()).add((int(client), int(rnd)))
    return trained


def test_a_simulation_runs_its_virtual_clients_on_both_machines_of_a_ray_cluster(cluster,
                                                                                  tmp_path):
    hosts, _ = cluster
    out, log = tmp_path / "out", tmp_path / "simulate.log"
    run = hosts.fedlora("head", [
        "simulate", "--model", "tiny-llama", "--num-clients", "4", "--rounds", "2",
        "--local-steps", "2", "--strategy", "fedsa-lora", "--cpus-per-client", "1",
        "--output-dir", str(out), "--run-config", "lr=0.01 dataset-size=80"],
        log, env={"RAY_ADDRESS": f"{HEAD}:6379", "RAY_DEDUP_LOGS": "0"})
    assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert [r["clients-replied"] for r in training_rounds(read_metrics(out))] == [4, 4]
    trained = clients_trained_by_machine(log)
    assert set(trained) == {HEAD, WORKER}, trained  # both machines trained virtual clients
    assert set().union(*trained.values()) == {(c, r) for c in range(4) for r in (1, 2)}
    # each client's B is one file in the run's personal-dir, which both machines see
    assert sorted(p.name for p in (out / "personal").glob("client-?.safetensors")) == [
        f"client-{i}.safetensors" for i in range(4)]
