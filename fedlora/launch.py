"""Run the fedlora app on a Flower SuperLink started here, and clean up every process it starts.

`run_app()` builds a throw-away Flower app (only a generated `pyproject.toml`; the
ServerApp/ClientApp code is imported from the installed packages), starts a private
`flower-superlink` described by a `SuperLinkSpec` (simulation on a free loopback port, or a
deployment SuperLink on the address the user gave, with TLS, SuperNode authentication and a
state database), registers the allowed SuperNode keys, runs
`flwr run <app> fedlora --stream [--federation-config ...]` against it and streams its output
to our stdout. Afterwards, whatever happened (normal end, exception, Ctrl-C, SIGTERM), it stops
`flwr run`, the SuperLink and every process the run spawned, then deletes the temporary
directory. `fedlora simulate` and `fedlora server` are thin callers.

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
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedlora import pacing
from fedlora.app_config import render_pyproject, toml_string
from fedlora.processes import (
    TAG_ENV_VAR,
    ProcessTracker,
    RunState,
    SignalGuard,
    claim_output_dir,
    cleanup,
    err,
    release_output_dir,
)
from fedlora.quiet import chatter, is_quiet

CONNECTION_NAME = "fedlora"
READY_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 30
NODE_TAIL_LINES = 80  # a SuperNode's last words can follow a 30-line traceback
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets under
# $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store (~70 bytes below RAY_TMPDIR).
MAX_RAY_TMPDIR_LEN = 36

_RUN_ID = re.compile(r"Successfully started run (\d+)")


# --------------------------------------------------------------------------- errors / output


class SimulationSetupError(RuntimeError):
    """The Flower infrastructure (SuperLink, temp dir, executables) could not be set up."""


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


def _venv_bin() -> Path:
    """Return the bin dir next to sys.executable, checking the Flower executables exist there."""
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
    missing = [
        n for n in ("flwr", "flower-superlink", "flower-superexec") if not (bin_dir / n).exists()
    ]
    if missing:
        raise SimulationSetupError(
            f"expected {', '.join(missing)} next to {sys.executable} in {bin_dir}, but they are "
            "missing; install 'flwr[simulation]>=1.41,<1.42' into this environment"
        )
    return bin_dir


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


def _child_env(bin_dir: Path, flwr_home: Path, ray_tmp: Path, tag: str) -> dict[str, str]:
    """Return the environment shared by every process of the run (incl. the cleanup tag)."""
    env = dict(os.environ)
    env.update(
        {
            # The SuperLink launches `flower-superexec` by name, so our venv must come first.
            "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
            "RAY_TMPDIR": str(ray_tmp),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            TAG_ENV_VAR: tag,
        }
    )
    return env


# --------------------------------------------------------------------------- SuperLink


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of a text file ('' if unreadable)."""
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(state: RunState, cmd: list[str], env: dict[str, str], stdout: Any
           ) -> subprocess.Popen[bytes]:
    """Start one process of the run in the temp dir, in a session of its own (a terminal's
    Ctrl-C reaches only us, and we stop the run in order), tracked for cleanup."""
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd, cwd=state.tmp, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.STDOUT, start_new_session=True)
    if state.tracker is not None:
        state.tracker.add_session(proc.pid)
    return proc


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
    state.superlink = _spawn(state, cmd, env, state.log_handle)
    state.tracker.start()


def _start_gate(state: RunState, env: dict[str, str], spec: SuperLinkSpec, upstream_port: int,
                log: Path) -> subprocess.Popen[bytes]:
    """Start the fleet gate (server/fleet_gate.py) on the public address, in front of the
    SuperLink on 127.0.0.1:upstream_port; its log goes to `log`."""
    cmd = [sys.executable, "-m", "server.fleet_gate", "--listen", f"{spec.host}:{spec.port}",
           "--upstream", f"127.0.0.1:{upstream_port}"]
    if spec.tls:
        cmd += ["--certfile", str(spec.cert), "--keyfile", str(spec.key),
                "--ca-file", str(spec.ca_cert)]
    state.gate_log = log.open("wb")
    state.gate = _spawn(state, cmd, env, state.gate_log)
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
    state.flwr_run = _spawn(state, cmd, env, subprocess.PIPE)
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


def _register_keys(bin_dir: Path, env: dict[str, str], cwd: Path, keys: Iterable[Path]) -> None:
    """`flwr supernode register` each allowed SuperNode public key with the SuperLink."""
    for key in keys:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "register", str(key), CONNECTION_NAME],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 and "already in use" in output:
            # a resumed server keeps its state database, and the key is still registered there
            err(f"SuperNode key {key} is already registered (kept in the state database)")
            continue
        if proc.returncode != 0:
            raise SimulationSetupError(
                f"could not register SuperNode key {key} (expected an OpenSSH ECDSA public "
                f"key, e.g. from `fedlora certs node`): {output[-400:]}")
        err(f"registered SuperNode key {key}")


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
    env = _child_env(bin_dir, flwr_home, ray_tmp, state.tag)
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
    _register_keys(bin_dir, env, state.tmp, spec.authorized_keys)
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
    bin_dir = _venv_bin()
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


# The task commands a SuperNode's SuperExec starts by name (flwr 1.41 TASK_TYPE_TO_COMMAND).
GUARDED_COMMANDS = ("flwr-clientapp", "flwr-agentapp", "flwr-model", "flwr-connector",
                    "flwr-serverapp", "flwr-simulation")


def _write_guard_shims(folder: Path) -> None:
    """One executable per GUARDED_COMMANDS name that runs clients/app_guard.py instead."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in GUARDED_COMMANDS:
        shim = folder / name  # -P: the working directory never goes on sys.path
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -P -m clients.app_guard {name} "$@"\n',
                        encoding="utf-8")
        shim.chmod(0o755)


_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
# What a SuperNode prints when the SuperLink accepted it, and when it stops on its own (as a
# flwr 1.41 SuperNode does once the SuperLink answers it 401: it no longer knows the node).
MARKS = {"connected": "SuperNode ID:", "stopped": "SuperNode terminated gracefully"}


def _echo(stream: IO[bytes], codes: list[int], tail: list[str], seen: set[str]) -> None:
    """Copy a child's output to our stdout, line by line, noting Flower's exit codes, the
    MARKS seen, and keeping the last NODE_TAIL_LINES lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if match := _FLOWER_EXIT.search(line):
            codes.append(int(match.group(1)))
        seen.update(name for name, mark in MARKS.items() if mark in line)
        tail.append(line)
        del tail[:-NODE_TAIL_LINES]
        sys.stdout.write(line)
        sys.stdout.flush()


@dataclass(frozen=True)
class NodeExit:
    """How a SuperNode ended: its exit status, the Flower exit code it reported (e.g. 305
    when it could not connect), and the last lines it printed."""

    status: int
    flower_code: int | None
    output: str
    connected: bool = False  # the SuperLink had accepted it (Flower printed its node ID)
    stopped_itself: bool = False  # it ended on its own, without a Flower error code


WORKER_RESTART_S = 1.0  # pause before starting a worker that died again


class WorkerSupervisor:
    """Keeps the node's resident ClientApp worker (`clients.worker`) running: starts it, and
    starts it again when it dies (counted, logged), until `stop()`."""

    def __init__(self, state: RunState, env: dict[str, str], socket_path: Path) -> None:
        """Supervise a worker listening on `socket_path`, started with `env`."""
        self.state, self.env, self.socket_path = state, env, socket_path
        self.cmd = [sys.executable, "-P", "-m", "clients.worker", "--socket", str(socket_path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Start the worker and watch it."""
        self._thread.start()

    def stop(self) -> None:
        """Stop restarting it (cleanup stops the process itself, by PID)."""
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self.proc = _spawn(self.state, self.cmd, self.env, None)
            self.starts += 1
            code = self.proc.wait()
            if self._stopped.is_set():
                return
            print(f"[fedlora] the ClientApp worker (pid {self.proc.pid}) ended with code {code}; "
                  f"starting it again (start {self.starts + 1})", file=sys.stderr, flush=True)
            self._stopped.wait(WORKER_RESTART_S)


def run_supernode(flags: list[str], isolation: str = "resident",
                  poll_s: float = pacing.NODE_POLL_S) -> NodeExit:
    """Run `flower-supernode FLAGS` in the foreground, echo its output, stop it and its
    ClientApp processes on exit, Ctrl-C or SIGTERM; return how it ended. `isolation`:
    "resident" runs every ClientApp task in one long-lived worker process (clients.worker),
    "subprocess" in a fresh process per message (Flower's default). `poll_s`: an idle
    node's wait between asking the server for a message (clients.supernode)."""
    bin_dir = _venv_bin()
    guard = SignalGuard()
    guard.install()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-node-"))
    state = RunState(tmp=tmp, tag=uuid.uuid4().hex)
    code, flower_codes, tail, seen = 1, list[int](), list[str](), set[str]()
    worker: WorkerSupervisor | None = None
    try:
        try:
            env = _child_env(bin_dir, Path(os.environ.get("FLWR_HOME", tmp / "flwr_home")),
                             tmp / "ray", state.tag)
            # The SuperNode starts its task processes by name: ours come first on its PATH,
            # so it runs only fedlora's own ClientApp (clients/app_guard.py).
            _write_guard_shims(tmp / "guard")
            env["PATH"] = os.pathsep.join([str(tmp / "guard"), env["PATH"]])
            env[pacing.SUPEREXEC_POLL_ENV] = str(pacing.SUPEREXEC_POLL_S)
            state.tracker = ProcessTracker(state.tag, [tmp])
            if isolation == "resident":
                env["FEDLORA_WORKER_SOCKET"] = str(tmp / "worker.sock")
                worker = WorkerSupervisor(state, env, tmp / "worker.sock")
                worker.start()
            supernode = [sys.executable, "-P", "-m", "clients.supernode",
                         "--poll-interval", str(poll_s), *flags]
            node = _spawn(state, supernode, env, subprocess.PIPE)
            state.superlink = node  # stopped by kill_run_processes like a SuperLink
            state.tracker.start()
            # The SuperExec child inherits stdout, so EOF can come long after the SuperNode
            # exits: copy output in a thread and end when the SuperNode process ends.
            echo = threading.Thread(target=_echo, args=(node.stdout, flower_codes, tail, seen),
                                    daemon=True)
            echo.start()
            code = node.wait()
            echo.join(timeout=2.0)
        finally:
            guard.cleaning = True
            if worker is not None:
                worker.stop()
            cleanup(state)
    finally:
        guard.restore()
    guard.raise_pending()
    flower_code = flower_codes[0] if flower_codes else None
    return NodeExit(code, flower_code, "".join(tail), "connected" in seen,
                    "stopped" in seen and flower_code is None)
