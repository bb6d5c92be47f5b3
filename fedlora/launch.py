"""Run the fedlora app on a Flower SuperLink started here, and clean up every process it starts.

`run_app()` builds a throw-away Flower app (only a generated `pyproject.toml`; the
ServerApp/ClientApp code is imported from the installed packages), starts a private
`flower-superlink` described by a `SuperLinkSpec` (simulation on a free loopback port, or a
deployment SuperLink on the address the user gave, with TLS, SuperNode authentication and a
state database), registers the allowed SuperNode keys, runs
`flwr run <app> fedlora --stream [--federation-config ...]` against it and streams its output
to our stdout. Afterwards, whatever happened (normal end, exception, Ctrl-C, SIGTERM), it stops
`flwr run`, the SuperLink and every process the run spawned, then deletes the temporary
directory. `simulations.runner.run_simulation` and `fedlora server` are thin callers.

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
  also ignore SIGTERM and survive the raylet. Hence `_ProcessTracker`: env tag, our temp
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

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

ConfigValue = int | float | bool | str

CONNECTION_NAME = "fedlora"
TAG_ENV_VAR = "FEDLORA_SIM_RUN_TAG"
READY_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
TERM_GRACE_S = 5.0
KILL_WAIT_S = 5.0
TAGGED_GRACE_S = 3.0  # flwr-simulation and Ray's gcs_server/raylet often ignore SIGTERM anyway
REAP_WAIT_S = 2.0
TRACK_INTERVAL_S = 1.0
LOG_TAIL_LINES = 30
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets under
# $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store (~70 bytes below RAY_TMPDIR).
MAX_RAY_TMPDIR_LEN = 36

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


# --------------------------------------------------------------------------- errors / output


class SimulationSetupError(RuntimeError):
    """The Flower infrastructure (SuperLink, temp dir, executables) could not be set up."""


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start the SuperLink: simulation on loopback, or a deployment server."""

    simulation: bool = True
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    ca_cert: Path | None = None  # TLS: all three files, or none (insecure)
    cert: Path | None = None
    key: Path | None = None
    supernode_auth: bool = False
    authorized_keys: tuple[Path, ...] = ()  # SuperNode public keys registered at start
    database: Path | None = None

    @property
    def connect_host(self) -> str:
        """Where this machine reaches the SuperLink: loopback for a wildcard bind."""
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


def _err(message: str) -> None:
    """Print one prefixed diagnostic message to stderr."""
    print(f"[fedlora] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- TOML generation


def _toml_string(text: str) -> str:
    """Return `text` as a TOML basic string with every character TOML requires escaped."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        elif 0xD800 <= ord(char) <= 0xDFFF:
            raise ValueError(f"string {text!r} contains a lone surrogate, which TOML cannot encode")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    """Return a (dotted) run-config key as a TOML key; Flower flattens tables with '.'."""
    if not isinstance(key, str):
        raise TypeError(f"app_config keys must be str, got {key!r} ({type(key).__name__})")
    return ".".join(
        part if _BARE_KEY.match(part) else _toml_string(part) for part in key.split(".")
    )


def _toml_value(key: str, value: object) -> str:
    """Return `value` as a TOML literal; floats stay floats (1.0, not 1)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form, always has '.', 'e', or is 'inf'/'nan'
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(
        f"app_config[{key!r}] = {value!r} has type {type(value).__name__}; Flower run configs "
        "only accept int, float, bool or str (use a comma-separated str for lists)"
    )


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into dotted keys, like Flower's `flatten_dict`."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, full))
        else:
            flat[full] = value
    return flat


def _same_value(a: object, b: object) -> bool:
    """Compare two config values including their type (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _render_pyproject(app_config: Mapping[str, ConfigValue], serverapp: str, clientapp: str) -> str:
    """Render the app's pyproject.toml and verify it parses back to exactly `app_config`."""
    for name, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"{name}={ref!r} must look like 'package.module:attribute'")
    lines = [
        "[project]",
        'name = "fedlora-run"',
        'version = "0.1.0"',
        'description = "Generated by simulations.runner for one simulation run"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {_toml_string(serverapp)}",
        f"clientapp = {_toml_string(clientapp)}",
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{_toml_key(k)} = {_toml_value(k, v)}" for k, v in app_config.items()]
    text = "\n".join(lines) + "\n"
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(
            f"app_config cannot be written as a Flower run config ({exc}); check for keys "
            "that clash as both a value and a table prefix, e.g. 'a' and 'a.b'"
        ) from exc
    back = _flatten(parsed["tool"]["flwr"]["app"].get("config", {}))
    if back.keys() != dict(app_config).keys() or not all(
        _same_value(back[k], v) for k, v in app_config.items()
    ):
        raise ValueError(
            "app_config does not survive the TOML round trip (keys must be unique after "
            f"splitting on '.'); wrote {sorted(back)}, expected {sorted(app_config)}"
        )
    return text


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
    security = (f"root-certificates = {_toml_string(str(ca_cert))}\n" if ca_cert
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


# --------------------------------------------------------------------------- run state


@dataclass
class _RunState:
    """Everything a run owns and that cleanup must release."""

    tmp: Path
    tag: str
    extra_dirs: list[Path] = field(default_factory=list)
    superlink: subprocess.Popen[bytes] | None = None
    flwr_run: subprocess.Popen[bytes] | None = None
    superlink_log: Path | None = None
    log_handle: IO[bytes] | None = None
    tracker: _ProcessTracker | None = None


class _SignalGuard:
    """Turn SIGTERM into SystemExit (and keep SIGINT as KeyboardInterrupt) until cleanup starts.

    While cleanup runs, both signals are only recorded and re-raised once it is done, so a
    second Ctrl-C cannot leave processes behind. Handlers are only touched in the main thread.
    """

    def __init__(self) -> None:
        """Prepare an inactive guard."""
        self.cleaning = False
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (no-op outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        """Put the caller's handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def raise_pending(self) -> None:
        """Re-raise a signal that arrived during cleanup."""
        if self.pending == signal.SIGINT:
            raise KeyboardInterrupt
        if self.pending is not None:
            raise SystemExit(128 + self.pending)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        """Raise on the first signal; during cleanup only record it."""
        if self.cleaning:
            self.pending = signum
            _err(f"got {signal.Signals(signum).name} during cleanup; finishing cleanup first")
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        _err(f"got {signal.Signals(signum).name}; stopping and cleaning up")
        raise SystemExit(128 + signum)


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
    state: _RunState, bin_dir: Path, env: dict[str, str], spec: SuperLinkSpec, port: int,
    log_file: Path | None
) -> None:
    """Start `flower-superlink` as `spec` says, in its own session, logging to a file."""
    state.superlink_log = Path(log_file) if log_file is not None else state.tmp / "superlink.log"
    state.superlink_log.parent.mkdir(parents=True, exist_ok=True)
    state.log_handle = state.superlink_log.open("wb")
    cmd = [str(bin_dir / "flower-superlink"), *spec.flags(), "--host", spec.host,
           "--port", str(port), "--disable-runtime-dependency-installation"]
    state.tracker = _ProcessTracker(state.tag, [state.tmp, *state.extra_dirs])
    state.superlink = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd,
        cwd=state.tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=state.log_handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state.tracker.add_session(state.superlink.pid)
    state.tracker.start()


def _wait_until_ready(state: _RunState, spec: SuperLinkSpec, port: int,
                     timeout: float = READY_TIMEOUT_S) -> None:
    """Poll /health until it answers 200; fail fast if the SuperLink dies."""
    assert state.superlink is not None
    url = f"{'https' if spec.tls else 'http'}://{spec.connect_host}:{port}/health"
    context = ssl.create_default_context(cafile=str(spec.ca_cert)) if spec.tls else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = state.superlink.poll()
        if code is not None:
            raise SimulationSetupError(
                f"flower-superlink exited with code {code} before it became ready on port {port} "
                f"(expected it to keep running). Last lines of {state.superlink_log}:\n"
                f"{_tail(state.superlink_log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:  # loopback
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise SimulationSetupError(
        f"flower-superlink did not answer {url} within {timeout:.0f}s (expected HTTP 200). "
        f"Check that the port is free and the machine is not overloaded. Last lines of "
        f"{state.superlink_log}:\n{_tail(state.superlink_log)}"
    )


# --------------------------------------------------------------------------- flwr run / status


def _stream_flwr_run(
    state: _RunState, bin_dir: Path, env: dict[str, str], app_dir: Path, fed_cfg: str | None
) -> tuple[int, int | None]:
    """Run `flwr run --stream`, echo its output live, return (exit code, run id or None)."""
    cmd = [str(bin_dir / "flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
    if fed_cfg:
        cmd += ["--federation-config", fed_cfg]
    state.flwr_run = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd,
        cwd=state.tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal Ctrl-C reaches only us; we stop it in order
    )
    if state.tracker is not None:
        state.tracker.add_session(state.flwr_run.pid)
    assert state.flwr_run.stdout is not None
    run_id: int | None = None
    out = sys.stdout
    for raw in iter(state.flwr_run.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if run_id is None and (match := _RUN_ID.search(line)):
            run_id = int(match.group(1))
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
            _err(
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
        _err(
            f"run {r.get('run-id')} ended with status {r.get('status')!r} (expected "
            f"'finished:completed'): {r.get('status-details') or 'no details'}. "
            "The ServerApp/simulation traceback is in the streamed log above."
        )
    return not failed


# --------------------------------------------------------------------------- process tracking


@dataclass(frozen=True)
class _Proc:
    """One /proc entry: pid, session id, zombie flag, and whether it carries our tag."""

    pid: int
    sid: int
    zombie: bool
    tagged: bool


def _read_proc(pid: int, needle: bytes, markers: list[bytes]) -> _Proc | None:
    """Read one process from /proc (None if it vanished or belongs to another user)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return None
    tagged = needle in b"\0" + environ or any(m in cmdline for m in markers)
    return _Proc(pid=pid, sid=int(fields[3]), zombie=fields[0] in ("Z", "X"), tagged=tagged)


class _ProcessTracker:
    """Identify this run's processes, including ones whose environment Ray has overwritten.

    A process belongs to the run if its environment carries our tag, its cmdline names one
    of our temp dirs, or it lives in a session in which a tagged process was seen. Ray's
    `setproctitle` (ray::DashboardAgent, ray::RuntimeEnvAgent, ...) overwrites the memory
    /proc/<pid>/environ reads from, so the tag alone misses them; they stay in the session
    of the `flower-superexec` that the SuperLink started, which a background scan records
    while the tag is still readable. The caller's own session is never targeted.
    """

    def __init__(
        self, tag: str, markers: Iterable[Path], interval: float = TRACK_INTERVAL_S
    ) -> None:
        """Prepare a tracker for the run tagged `tag` (not started yet)."""
        self._needle = f"\0{TAG_ENV_VAR}={tag}\0".encode()
        self._markers = [f"{m}{os.sep}".encode() for m in markers]
        self._own_pid = os.getpid()
        self._own_sid = os.getsid(0)
        self._sids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread: threading.Thread | None = None

    def add_session(self, sid: int) -> None:
        """Record a session we created ourselves (start_new_session=True children)."""
        if sid != self._own_sid:
            with self._lock:
                self._sids.add(sid)

    def start(self) -> None:
        """Start the background scan that records sessions while the run is going."""
        self._thread = threading.Thread(target=self._loop, name="fedlora-run-tracker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background scan."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def scan(self) -> list[int]:
        """Return the live pids of this run (and remember the sessions of tagged ones)."""
        procs = [
            proc
            for entry in os.listdir("/proc")
            if entry.isdigit() and int(entry) != self._own_pid
            if (proc := _read_proc(int(entry), self._needle, self._markers)) is not None
        ]
        with self._lock:
            self._sids.update(p.sid for p in procs if p.tagged and p.sid != self._own_sid)
            sids = set(self._sids)
        return [
            p.pid
            for p in procs
            if not p.zombie and p.sid != self._own_sid and (p.tagged or p.sid in sids)
        ]

    def _loop(self) -> None:
        """Scan every `interval` seconds until stopped."""
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError):
                self.scan()


# --------------------------------------------------------------------------- cleanup


def _is_alive(pid: int) -> bool:
    """Return True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _signal_pids(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send `sig` to each pid, ignoring ones that are already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until all pids are gone (or zombies); return the ones still alive."""
    pending = [p for p in pids if _is_alive(p)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
        pending = [p for p in pending if _is_alive(p)]
    return pending


def _wait_reaped(pids: Iterable[int], timeout: float) -> None:
    """Wait briefly until killed pids have left the process table (init reaps orphans)."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if Path(f"/proc/{p}").exists()]
        if pending:
            time.sleep(0.05)


def _stop_group(
    proc: subprocess.Popen[bytes] | None, name: str, grace: float = TERM_GRACE_S
) -> None:
    """SIGTERM a child's process group, SIGKILL it after `grace` s, and reap the child."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            if sig == signal.SIGTERM:
                _err(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:.0f}s; sending SIGKILL")
    _err(f"{name} (pid {proc.pid}) survived SIGKILL; it may need manual cleanup")


def _kill_run_processes(state: _RunState) -> None:
    """Stop flwr run, then the SuperLink together with every process of the run (SuperExec, Ray)."""
    tracker = state.tracker
    if tracker is not None:
        tracker.stop()
    _stop_group(state.flwr_run, "flwr run")
    if tracker is None:  # the SuperLink was never started
        return
    pids = tracker.scan()
    if state.superlink is not None and state.superlink.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.superlink.pid, signal.SIGTERM)
    _signal_pids(pids, signal.SIGTERM)
    _wait_gone(pids, TAGGED_GRACE_S)
    _stop_group(state.superlink, "flower-superlink")
    seen = set(pids)
    for _ in range(3):  # rescan: Ray may still spawn a process while shutting down
        survivors = tracker.scan()
        if not survivors:
            break
        seen.update(survivors)
        _signal_pids(survivors, signal.SIGKILL)
        _wait_gone(survivors, KILL_WAIT_S)
    _wait_reaped(seen, REAP_WAIT_S)
    if survivors := tracker.scan():
        _err(
            f"processes {survivors} from this run survived SIGKILL (expected none); "
            f"check them with `ps -o pid,args -p {','.join(map(str, survivors))}`"
        )


def _cleanup(state: _RunState) -> None:
    """Release everything the run owns: processes first, then files."""
    try:
        _kill_run_processes(state)
    finally:
        if state.log_handle is not None:
            state.log_handle.close()
        for path in (state.tmp, *state.extra_dirs):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                _err(f"could not delete temp dir {path}; delete it by hand")


# --------------------------------------------------------------------------- public API


def _register_keys(bin_dir: Path, env: dict[str, str], cwd: Path, keys: Iterable[Path]) -> None:
    """`flwr supernode register` each allowed SuperNode public key with the SuperLink."""
    for key in keys:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "register", str(key), CONNECTION_NAME],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise SimulationSetupError(
                f"could not register SuperNode key {key} (expected an OpenSSH ECDSA public "
                f"key, e.g. from `fedlora certs node`): {(proc.stdout + proc.stderr)[-400:]}")
        _err(f"registered SuperNode key {key}")


def _execute(
    state: _RunState,
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
    port = spec.port or _free_port()
    _write_flwr_config(flwr_home, spec.connect_host, port, spec.ca_cert if spec.tls else None)
    _start_superlink(state, bin_dir, env, spec, port, log_file)
    _wait_until_ready(state, spec, port)
    _register_keys(bin_dir, env, state.tmp, spec.authorized_keys)
    code, run_id = _stream_flwr_run(state, bin_dir, env, app_dir, fed_cfg)
    if code != 0:
        where = f"the SuperLink log {log_file}" if log_file is not None else "the SuperLink log"
        _err(f"`flwr run` exited with code {code} (expected 0); see its output above and {where}")
        if log_file is None:  # the default log lives in the temp dir, which is about to go
            _err(f"last lines of the SuperLink log:\n{_tail(state.superlink_log)}")
        return code
    if run_id is None:
        _err("`flwr run` did not print 'Successfully started run <id>'; checking all runs instead")
    return 0 if _run_succeeded(bin_dir, env, state.tmp, run_id) else 1


def run_app(
    app_config: dict[str, int | float | bool | str],
    spec: SuperLinkSpec,
    *,
    federation_config: str | None = None,
    serverapp: str = "server.server_app:app",
    clientapp: str = "clients.client_app:app",
    log_file: Path | None = None,
) -> int:
    """Start a SuperLink per `spec`, run the app on it, stop everything; return the exit code.

    `app_config` is the full run_config of the app. The SuperLink log goes to `log_file` if
    given (overwritten), otherwise to the temp dir. Every process started here is stopped
    and the temp dir deleted before this returns or raises (also on Ctrl-C and SIGTERM,
    which are re-raised as KeyboardInterrupt / SystemExit(143) after cleanup).
    Raises ValueError/TypeError for invalid arguments and SimulationSetupError if the
    SuperLink cannot be started; a failed run returns a non-zero code instead.
    """
    pyproject = _render_pyproject(app_config, serverapp, clientapp)
    bin_dir = _venv_bin()
    guard = _SignalGuard()
    guard.install()
    try:
        state = _RunState(tmp=Path(tempfile.mkdtemp(prefix="fedlora-run-")), tag=uuid.uuid4().hex)
        try:
            code = _execute(state, pyproject, spec, federation_config, bin_dir, log_file)
        finally:
            guard.cleaning = True
            _cleanup(state)
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
) -> int:
    """Run one Flower simulation with `num_clients` SuperNodes; return its exit code (0 = ok)."""
    fed_cfg = _federation_config(num_clients, num_cpus_per_client, num_gpus_per_client)
    return run_app(app_config, SuperLinkSpec(simulation=True), federation_config=fed_cfg,
                   log_file=log_file)


_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")


def _echo(stream: IO[bytes], codes: list[int]) -> None:
    """Copy a child's output to our stdout, line by line, noting Flower's exit codes."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if match := _FLOWER_EXIT.search(line):
            codes.append(int(match.group(1)))
        sys.stdout.write(line)
        sys.stdout.flush()


def run_supernode(flags: list[str]) -> tuple[int, int | None]:
    """Run `flower-supernode FLAGS` in the foreground, echo its output, stop it and its
    ClientApp processes on exit, Ctrl-C or SIGTERM; return (exit status, the Flower exit
    code it reported, if any: e.g. 305 for a node the SuperLink refused)."""
    bin_dir = _venv_bin()
    guard = _SignalGuard()
    guard.install()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-node-"))
    state = _RunState(tmp=tmp, tag=uuid.uuid4().hex)
    code, flower_codes = 1, []
    try:
        try:
            env = _child_env(bin_dir, Path(os.environ.get("FLWR_HOME", tmp / "flwr_home")),
                             tmp / "ray", state.tag)
            state.tracker = _ProcessTracker(state.tag, [tmp])
            node = subprocess.Popen(  # pylint: disable=consider-using-with
                [str(bin_dir / "flower-supernode"), *flags], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            state.superlink = node  # stopped by _kill_run_processes like a SuperLink
            state.tracker.add_session(node.pid)
            state.tracker.start()
            # The SuperExec child inherits stdout, so EOF can come long after the SuperNode
            # exits: copy output in a thread and end when the SuperNode process ends.
            echo = threading.Thread(target=_echo, args=(node.stdout, flower_codes), daemon=True)
            echo.start()
            code = node.wait()
            echo.join(timeout=2.0)
        finally:
            guard.cleaning = True
            _cleanup(state)
    finally:
        guard.restore()
    guard.raise_pending()
    return code, (flower_codes[0] if flower_codes else None)
