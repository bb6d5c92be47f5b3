"""Run the fedlora app on a Flower SuperLink started here, and clean up every process it starts.

`run_app()` builds a throw-away Flower app (only a generated `pyproject.toml`; the
ServerApp/ClientApp code is imported from the installed packages), starts a private
`flower-superlink` described by a `SuperLinkSpec` (simulation on a free loopback port, or a
deployment SuperLink on the address the user gave, with TLS, SuperNode authentication and a
state database), registers the allowed SuperNode keys, runs
`flwr run <app> fedlora --stream [--federation-config ...]` against it and streams its output
to our stdout. Afterwards, whatever happened (normal end, exception, Ctrl-C, SIGTERM), it stops
`flwr run`, the SuperLink and every process the run spawned, then deletes the temporary
directory. `fedlora simulate` and `fedlora server` are thin callers; a client node's side
(`fedlora client`) is supernode.py.

Facts this relies on (checked against flwr 1.41.0 / ray 2.55.1):

* A self-started `--simulation` SuperLink honours `flwr run --federation-config` (the run's
  `num-supernodes` / `client-resources-*` are merged over the SuperLink's default
  simulation config), so the auto-started `:local:` SuperLink is not needed.
* `client-resources-num-cpus` is a uint32 in Flower's `SimulationConfig`: fractional CPUs
  are rejected. `client-resources-num-gpus` is a double.
* The SuperLink starts `flower-superexec` by name from `PATH` (so the venv's bin dir must
  be on it), in a new session; `flwr-simulation` and all Ray processes (gcs_server,
  raylet, monitor, log_monitor, dashboard, agents, `ray::...` workers) live in that
  SuperExec session, not in the SuperLink's, so killing the SuperLink's group is not
  enough. They inherit the SuperLink's environment, but Ray's `setproctitle` overwrites
  what /proc/<pid>/environ shows for `ray::DashboardAgent`/`ray::RuntimeEnvAgent`, which
  also ignore SIGTERM and survive the raylet. Hence `ProcessTracker`: env tag, our temp
  dir on the cmdline, or membership in a session where a tagged process was seen.
* On SIGTERM the SuperLink waits for open connections (the `flwr run --stream` log
  stream), so `flwr run` is stopped first.
* `flwr run --stream` exits 0 even when the ServerApp raises, so the run status is read
  back with `flwr ls --run-id <id> --format json` (`finished:completed` means success).
* Ray honours `RAY_TMPDIR`, so its session files land in our temp dir and are deleted.
* `--enable-supernode-auth` needs TLS; keys are registered with `flwr supernode register`
  through the Control API, which listens on the same port as the Fleet API.

Nothing from Flower is imported here: everything runs in subprocesses.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.runtime import node_keys
from fedlora.runtime.app_config import render_pyproject, toml_string
from fedlora.runtime.processes import (
    ProcessTracker,
    RunState,
    SignalGuard,
    SimulationSetupError,
    child_env,
    claim_output_dir,
    cleanup,
    err,
    release_output_dir,
    spawn,
    venv_bin,
)
from fedlora.runtime.quiet import chatter, is_quiet

CONNECTION_NAME = "fedlora"
READY_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 30
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets under
# $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store (~70 bytes below RAY_TMPDIR).
MAX_RAY_TMPDIR_LEN = 36

_RUN_ID = re.compile(r"Successfully started run (\d+)")


# --------------------------------------------------------------------------- the SuperLink's spec


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start the SuperLink: simulation on loopback, or a deployment server."""

    simulation: bool = True
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    # Deployment only: the SuperLink (and with it the Control API) listens on
    # 127.0.0.1:control_port, and the fleet gate on host:port forwards only the Fleet API.
    control_port: int = 0  # 0 = a free port
    ca_cert: Path | None = None  # TLS: all three files, or none (insecure)
    cert: Path | None = None
    key: Path | None = None
    supernode_auth: bool = False
    authorized_keys: tuple[Path, ...] = ()  # SuperNode public keys registered at start
    database: Path | None = None
    gate_flags: tuple[str, ...] = ()  # limit flags of the fleet gate (server/fleet_gate.py)

    @property
    def gated(self) -> bool:
        """Whether a fleet gate stands on the public address (every deployment server)."""
        return not self.simulation

    @property
    def connect_host(self) -> str:
        """Where this machine reaches the public address: loopback for a wildcard bind."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def tls(self) -> bool:
        """Whether the SuperLink serves HTTPS."""
        return self.cert is not None

    def flags(self) -> list[str]:
        """The flower-superlink arguments for this spec (without host/port)."""
        out = ["--simulation"] if self.simulation else []
        if self.tls:
            out += ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.cert),
                    "--ssl-keyfile", str(self.key)]
        else:
            out.append("--insecure")
        if self.supernode_auth:
            out.append("--enable-supernode-auth")
        if self.database is not None:
            out += ["--database", str(self.database)]
        return out


# --------------------------------------------------------------------------- configuration


def _federation_config(num_clients: int, num_cpus: float, num_gpus: float) -> str:
    """Build the `--federation-config` string; Flower 1.41 only takes whole CPUs per client."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if not float(num_cpus).is_integer() or num_cpus < 1:
        raise ValueError(
            f"num_cpus_per_client must be a whole number >= 1, got {num_cpus!r}: Flower 1.41 "
            "stores client-resources-num-cpus as an unsigned int and rejects fractions. "
            "Round it, or limit parallelism with num_gpus_per_client instead."
        )
    if not math.isfinite(num_gpus) or num_gpus < 0:
        raise ValueError(f"num_gpus_per_client must be a finite number >= 0, got {num_gpus!r}")
    return (
        f"num-supernodes={num_clients} client-resources-num-cpus={int(num_cpus)} "
        f"client-resources-num-gpus={float(num_gpus)!r}"
    )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_flwr_config(flwr_home: Path, host: str, port: int, ca_cert: Path | None) -> None:
    """Write $FLWR_HOME/config.toml with the `fedlora` connection (local address) as default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {toml_string(str(ca_cert))}\n" if ca_cert
                else "insecure = true\n")
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "{host}:{port}"\n' + security,
        encoding="utf-8",
    )


def _ray_tmpdir(tmp: Path) -> tuple[Path, Path | None]:
    """Return (RAY_TMPDIR, extra dir to delete); short enough for Ray's AF_UNIX sockets."""
    inside = tmp / "ray"
    if len(str(inside)) <= MAX_RAY_TMPDIR_LEN:
        return inside, None
    short = Path(tempfile.mkdtemp(prefix="fsim-ray-", dir="/tmp"))
    return short, short


# --------------------------------------------------------------------------- SuperLink


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of a text file ('' if unreadable)."""
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start_superlink(
    state: RunState, bin_dir: Path, env: dict[str, str], spec: SuperLinkSpec, host: str,
    port: int, log_file: Path | None
) -> None:
    """Start `flower-superlink` on host:port as `spec` says, in its own session, logging to a
    file."""
    state.superlink_log = Path(log_file) if log_file is not None else state.tmp / "superlink.log"
    state.superlink_log.parent.mkdir(parents=True, exist_ok=True)
    state.log_handle = state.superlink_log.open("wb")
    cmd = [str(bin_dir / "flower-superlink"), *spec.flags(), "--host", host,
           "--port", str(port), "--disable-runtime-dependency-installation"]
    state.tracker = ProcessTracker(state.tag, [state.tmp, *state.extra_dirs])
    state.superlink = spawn(state, cmd, env, state.log_handle)
    state.tracker.start()


def _start_gate(state: RunState, env: dict[str, str], spec: SuperLinkSpec, upstream_port: int,
                log: Path) -> subprocess.Popen[bytes]:
    """Start the fleet gate (server/fleet_gate.py) on the public address, in front of the
    SuperLink on 127.0.0.1:upstream_port; its log goes to `log`."""
    cmd = [sys.executable, "-m", "server.fleet_gate", "--listen", f"{spec.host}:{spec.port}",
           "--upstream", f"127.0.0.1:{upstream_port}", *spec.gate_flags]
    if spec.tls:
        cmd += ["--certfile", str(spec.cert), "--keyfile", str(spec.key),
                "--ca-file", str(spec.ca_cert)]
    state.gate_log = log.open("wb")
    state.gate = spawn(state, cmd, env, state.gate_log)
    return state.gate


def _wait_until_ready(name: str, proc: subprocess.Popen[bytes], log: Path | None,
                      spec: SuperLinkSpec, host: str, port: int,
                      timeout: float = READY_TIMEOUT_S) -> None:
    """Poll http(s)://host:port/health until `name` (run by `proc`, logging to `log`) answers
    200; fail fast if `proc` dies."""
    url = f"{'https' if spec.tls else 'http'}://{host}:{port}/health"
    context = None
    if spec.tls:
        context = ssl.create_default_context(cafile=str(spec.ca_cert))
        context.check_hostname = False  # the certificate names the public address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise SimulationSetupError(
                f"{name} exited with code {code} before it became ready on {host}:{port} "
                f"(expected it to keep running). Last lines of {log}:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:  # loopback
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError,
                http.client.HTTPException):
            # not listening yet; an HTTPException when the probe's socket, to a port nothing
            # listens on yet, happened to get that very port as its own source port (a TCP
            # self-connect: it reads back its own request)
            pass
        time.sleep(0.2)
    raise SimulationSetupError(
        f"{name} did not answer {url} within {timeout:.0f}s (expected HTTP 200). "
        f"Check that the port is free and the machine is not overloaded. Last lines of "
        f"{log}:\n{_tail(log)}"
    )


# --------------------------------------------------------------------------- flwr run / status


def _stream_flwr_run(
    state: RunState, bin_dir: Path, env: dict[str, str], app_dir: Path, fed_cfg: str | None
) -> tuple[int, int | None]:
    """Run `flwr run --stream`, echo its output live, return (exit code, run id or None)."""
    cmd = [str(bin_dir / "flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
    if fed_cfg:
        cmd += ["--federation-config", fed_cfg]
    state.flwr_run = spawn(state, cmd, env, subprocess.PIPE)
    assert state.flwr_run.stdout is not None
    run_id: int | None = None
    out, quiet = sys.stdout, is_quiet()
    for raw in iter(state.flwr_run.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if run_id is None and (match := _RUN_ID.search(line)):
            run_id = int(match.group(1))
        if quiet and chatter(line):
            continue
        out.write(line)
        out.flush()
    return state.flwr_run.wait(), run_id


def _parse_json_output(text: str) -> dict[str, Any]:
    """Parse the JSON object printed by `flwr ... --format json` (ignoring stray lines)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    return dict(json.loads(text[start:]))


def _run_statuses(
    bin_dir: Path, env: dict[str, str], cwd: Path, run_id: int | None
) -> list[dict[str, Any]]:
    """Return the runs reported by `flwr ls --format json` (one run if run_id is known)."""
    cmd = [str(bin_dir / "flwr"), "ls", CONNECTION_NAME, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`flwr ls` exited with {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-500:]}"
        )
    payload = _parse_json_output(proc.stdout)
    runs = payload.get("runs")
    if not payload.get("success", False) or not isinstance(runs, list) or not runs:
        raise RuntimeError(f"`flwr ls` returned no run: {proc.stdout.strip()[-500:]}")
    return runs


def _run_succeeded(bin_dir: Path, env: dict[str, str], cwd: Path, run_id: int | None) -> bool:
    """Wait until the run is finished and return True only for `finished:completed`."""
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    runs: list[dict[str, Any]] = []
    while True:
        try:
            runs = _run_statuses(bin_dir, env, cwd, run_id)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            err(
                f"could not read the run status back from the SuperLink ({exc}); expected "
                "`flwr ls` to report it. Treating the run as failed."
            )
            return False
        if (
            all(str(r.get("status", "")).startswith("finished") for r in runs)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    failed = [r for r in runs if r.get("status") != "finished:completed"]
    for r in failed:
        err(
            f"run {r.get('run-id')} ended with status {r.get('status')!r} (expected "
            f"'finished:completed'): {r.get('status-details') or 'no details'}. "
            "The ServerApp/simulation traceback is in the streamed log above."
        )
    return not failed


# --------------------------------------------------------------------------- public API


def _register_keys(bin_dir: Path, env: dict[str, str], cwd: Path, keys: Iterable[Path],
                   out_dir: Path | None) -> None:
    """`flwr supernode register` each allowed SuperNode public key with the SuperLink, and
    keep the node ID each got, by key name, in `out_dir` (`fedlora.runtime.node_keys`)."""
    for key in keys:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "register", str(key), CONNECTION_NAME],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 and "already in use" in output:
            # a resumed server keeps its state database, and the key is still registered there
            known = [n for n, name in node_keys.read(out_dir).items()
                     if name == node_keys.key_name(key)] if out_dir else []
            err(f"SuperNode key {key} is already registered (kept in the state database)"
                + (f" as node {known[0]}" if known else ""))
            continue
        if proc.returncode != 0:
            raise SimulationSetupError(
                f"could not register SuperNode key {key} (expected an OpenSSH ECDSA public "
                f"key, e.g. from `fedlora certs node`): {output[-400:]}")
        node_id = node_keys.registered_id(output)
        if node_id is not None and out_dir is not None:
            node_keys.record(out_dir, node_id, node_keys.key_name(key))
        err(f"registered SuperNode key {key}" + (f" as node {node_id} (named "
                                                 f"{node_keys.key_name(key)!r} in the log and "
                                                 f"metrics)" if node_id is not None else ""))


def _execute(
    state: RunState,
    pyproject: str,
    spec: SuperLinkSpec,
    fed_cfg: str | None,
    bin_dir: Path,
    log_file: Path | None,
) -> int:
    """Set up the app dir, FLWR_HOME and SuperLink, run `flwr run`, and compute the exit code."""
    app_dir = state.tmp / "app"
    flwr_home = state.tmp / "flwr_home"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    ray_tmp, extra = _ray_tmpdir(state.tmp)
    if extra is not None:
        state.extra_dirs.append(extra)
    env = child_env(bin_dir, flwr_home, ray_tmp, state.tag)
    # A deployment SuperLink listens on loopback only; the gate takes the public address.
    host, port = (("127.0.0.1", spec.control_port or _free_port()) if spec.gated
                  else (spec.connect_host, spec.port or _free_port()))
    _write_flwr_config(flwr_home, host, port, spec.ca_cert if spec.tls else None)
    _start_superlink(state, bin_dir, env, spec, host, port, log_file)
    assert state.superlink is not None
    _wait_until_ready("flower-superlink", state.superlink, state.superlink_log, spec, host,
                      port)
    if spec.gated:
        gate_log = (log_file.parent if log_file else state.tmp) / "fleet-gate.log"
        gate = _start_gate(state, env, spec, port, gate_log)
        _wait_until_ready("the fleet gate", gate, gate_log, spec, spec.connect_host, spec.port)
        err(f"Control API (flwr ls / stop / supernode ls) on 127.0.0.1:{port}, this machine "
            f"only; {spec.host}:{spec.port} serves only the Fleet API (log: {gate_log})")
    _register_keys(bin_dir, env, state.tmp, spec.authorized_keys,
                   spec.database.parent if spec.database is not None else None)
    code, run_id = _stream_flwr_run(state, bin_dir, env, app_dir, fed_cfg)
    if code != 0:
        where = f"the SuperLink log {log_file}" if log_file is not None else "the SuperLink log"
        err(f"`flwr run` exited with code {code} (expected 0); see its output above and {where}")
        if log_file is None:  # the default log lives in the temp dir, which is about to go
            err(f"last lines of the SuperLink log:\n{_tail(state.superlink_log)}")
        return code
    if run_id is None:
        err("`flwr run` did not print 'Successfully started run <id>'; checking all runs instead")
    return 0 if _run_succeeded(bin_dir, env, state.tmp, run_id) else 1


def run_app(
    app_config: dict[str, int | float | bool | str],
    spec: SuperLinkSpec,
    *,
    federation_config: str | None = None,
    serverapp: str = "server.server_app:app",
    clientapp: str = "clients.client_app:app",
    log_file: Path | None = None,
    output_dir: Path | None = None,
) -> int:
    """Start a SuperLink per `spec`, run the app on it, stop everything; return the exit code.

    `app_config` is the full run_config of the app. The SuperLink log goes to `log_file` if
    given (overwritten), otherwise to the temp dir. With `output_dir`, processes that an
    earlier, killed run in that folder left behind are stopped first (`claim_output_dir`).
    Every process started here is stopped and the temp dir deleted before this returns or
    raises (also on Ctrl-C and SIGTERM,
    which are re-raised as KeyboardInterrupt / SystemExit(143) after cleanup).
    Raises ValueError/TypeError for invalid arguments and SimulationSetupError if the
    SuperLink cannot be started; a failed run returns a non-zero code instead.
    """
    pyproject = render_pyproject(app_config, serverapp, clientapp)
    bin_dir = venv_bin()
    guard = SignalGuard()
    guard.install()
    try:
        state = RunState(tmp=Path(tempfile.mkdtemp(prefix="fedlora-run-")), tag=uuid.uuid4().hex)
        try:
            if output_dir is not None:
                claim_output_dir(output_dir, state.tag)
            code = _execute(state, pyproject, spec, federation_config, bin_dir, log_file)
        finally:
            guard.cleaning = True
            cleanup(state)
            if output_dir is not None:
                release_output_dir(output_dir, state.tag)
    finally:
        guard.restore()
    guard.raise_pending()
    return code


def run_simulation(
    app_config: dict[str, int | float | bool | str],
    num_clients: int,
    *,
    num_cpus_per_client: float = 2.0,
    num_gpus_per_client: float = 0.0,
    log_file: Path | None = None,
    output_dir: Path | None = None,
) -> int:
    """Run one Flower simulation with `num_clients` SuperNodes; return its exit code (0 = ok)."""
    fed_cfg = _federation_config(num_clients, num_cpus_per_client, num_gpus_per_client)
    return run_app(app_config, SuperLinkSpec(simulation=True), federation_config=fed_cfg,
                   log_file=log_file, output_dir=output_dir)
