"""Network namespaces standing in for separate machines, for tests (and benchmarks) that run
a deployment across hosts: each host its own address on 10.87.0.0/24, all joined by a bridge in
a namespace of its own, and every process started in them stopped, and every namespace deleted,
by `Hosts.destroy`. Needs root and `ip netns` (`netns_unavailable` says why not).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flower_cli import FlowerCli
from test_simulation import SESSION_ENV

NET = "10.87.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


class Hosts:
    """Network namespaces standing in for separate machines, and the processes run in them."""

    def __init__(self, hosts: dict[str, int]) -> None:
        """`hosts`: name -> last byte of its address. Namespace names are unique to this
        object, so nothing else is touched."""
        tag = uuid.uuid4().hex[:6]
        self.hosts = dict(hosts)
        self.ns = {name: f"fl{tag}-{name}" for name in self.hosts}
        self.bridge = f"fl{tag}-br"
        self.procs: list[subprocess.Popen] = []

    def create(self) -> None:
        """A bridge namespace and one namespace per host, each with lo and eth0 up."""
        ip("netns", "add", self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for name, last in self.hosts.items():
            ns = self.ns[name]
            ip("netns", "add", ns)
            ip("-n", self.bridge, "link", "add", self.port(name), "type", "veth", "peer",
               "name", "eth0", "netns", ns)
            ip("-n", self.bridge, "link", "set", self.port(name), "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{NET}.{last}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def port(name: str) -> str:
        """The bridge side of a host's cable (at most 15 characters)."""
        return f"to-{name}"

    def link(self, name: str, up: bool) -> None:
        """Plug a host's cable in or pull it out."""
        ip("-n", self.bridge, "link", "set", self.port(name), "up" if up else "down")

    def fedlora(self, name: str, args: list[str], log: Path, env: dict | None = None
                ) -> subprocess.Popen:
        """`fedlora ARGS` on host `name`, logging to `log`."""
        return self.start(name, [sys.executable, "-m", "fedlora.cli.main", *args], log, env)

    def start(self, name: str, cmd: list[str], log: Path, env: dict | None = None
              ) -> subprocess.Popen:
        """`cmd` on host `name`, logging to `log`; stopped by `stop`."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[name], *cmd],
                                stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env={**os.environ, **SESSION_ENV, "PYTHONUNBUFFERED": "1",
                                     **(env or {})})
        self.procs.append(proc)
        return proc

    def flwr(self, name: str, home: Path, address: str, ca: Path) -> FlowerCli:
        """The Flower CLI on host `name`, pointed at `address`."""
        return FlowerCli(home, address, ca, prefix=("ip", "netns", "exec", self.ns[name]))

    def pids(self, name: str) -> list[int]:
        """Every process living in host `name`'s namespace."""
        out = ip("netns", "pids", self.ns[name], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, name: str) -> None:
        """SIGKILL everything on host `name` (a power cut)."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM what the tests started (fedlora stops its children), then kill the rest."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for name in self.hosts:
            self.kill_host(name)

    def destroy(self) -> None:
        """Stop every process, then delete every namespace this object made."""
        self.stop()
        for ns in [*self.ns.values(), self.bridge]:
            ip("netns", "del", ns, check=False)
        left = set(ip("netns", "list").stdout.split()) & {*self.ns.values(), self.bridge}
        assert not left, f"namespaces left behind: {left}"


def netns_unavailable() -> str | None:
    """Why this machine cannot run these tests (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"flprobe-{uuid.uuid4().hex[:6]}"
    made = ip("netns", "add", probe, check=False)
    ip("netns", "del", probe, check=False)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


@contextmanager
def made(hosts: dict[str, int]) -> Iterator[Hosts]:
    """`hosts` created, and destroyed with every process in them when the block ends (the
    test is skipped, with the reason, where namespaces cannot be made)."""
    import pytest

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Hosts(hosts)
    try:
        net.create()
        yield net
    finally:
        net.destroy()


def says(log: Path, text: str, times: int = 1):
    """True once `text` appears `times` times in `log`."""
    return lambda: log.exists() and log.read_text().count(text) >= times


def site_data(path: Path, offset: int) -> Path:
    """A node's own private data file (instruction/output)."""
    rows = [{"instruction": f"Add {a} and {a + offset}.", "output": str(2 * a + offset)}
            for a in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
