"""The processes of one Flower run: start them, find them (even the ones Ray renames), stop them.

`spawn` starts each one in a session of its own, with the environment of `child_env` (the
venv's Flower executables, found by `venv_bin`, first on PATH). Every process a run starts
inherits the environment variable `TAG_ENV_VAR` with the run's own value; `ProcessTracker`
finds them by it (and by session, for the Ray processes whose `setproctitle` hides their
environment), and `cleanup` stops `flwr run`, the SuperLink or SuperNode, and every tracked
process, SIGTERM first and SIGKILL after a grace period. `SignalGuard` turns SIGTERM into an
exception and keeps a second Ctrl-C from interrupting the cleanup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

TAG_ENV_VAR = "FEDLORA_SIM_RUN_TAG"
TERM_GRACE_S = 5.0
KILL_WAIT_S = 5.0
TAGGED_GRACE_S = 3.0  # flwr-simulation and Ray's gcs_server/raylet often ignore SIGTERM anyway
REAP_WAIT_S = 2.0
TRACK_INTERVAL_S = 1.0
RUN_FILE = ".fedlora-run.json"  # in the output dir: which run (tag, launcher pid) uses it


def err(message: str) -> None:
    """Print one prefixed diagnostic message to stderr."""
    print(f"[fedlora] {message}", file=sys.stderr, flush=True)


@dataclass
class RunState:
    """Everything a run owns and that cleanup must release."""

    tmp: Path
    tag: str
    extra_dirs: list[Path] = field(default_factory=list)
    superlink: subprocess.Popen[bytes] | None = None
    flwr_run: subprocess.Popen[bytes] | None = None
    superlink_log: Path | None = None
    log_handle: IO[bytes] | None = None
    gate: subprocess.Popen[bytes] | None = None  # deployment: the fleet gate
    gate_log: IO[bytes] | None = None
    tracker: ProcessTracker | None = None


class SignalGuard:
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
            err(f"got {signal.Signals(signum).name} during cleanup; finishing cleanup first")
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        err(f"got {signal.Signals(signum).name}; stopping and cleaning up")
        raise SystemExit(128 + signum)


class SimulationSetupError(RuntimeError):
    """The Flower infrastructure (SuperLink, temp dir, executables) could not be set up."""


def venv_bin() -> Path:
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


def child_env(bin_dir: Path, flwr_home: Path, ray_tmp: Path, tag: str) -> dict[str, str]:
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


def spawn(state: RunState, cmd: list[str], env: dict[str, str], stdout: Any
          ) -> subprocess.Popen[bytes]:
    """Start one process of the run in the temp dir, in a session of its own (a terminal's
    Ctrl-C reaches only us, and we stop the run in order), tracked for cleanup."""
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd, cwd=state.tmp, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.STDOUT, start_new_session=True)
    if state.tracker is not None:
        state.tracker.add_session(proc.pid)
    return proc


@dataclass(frozen=True)
class _Proc:
    """One process: pid, session id, zombie flag, and whether it carries our tag."""

    pid: int
    sid: int
    zombie: bool
    tagged: bool


def _read_proc(proc: psutil.Process, tag: str, markers: list[str]) -> _Proc | None:
    """What the tracker needs of one process (None if it vanished or is not ours to read)."""
    try:
        environ = proc.environ()
        cmdline = "\0".join(proc.cmdline())
        zombie = proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        sid = os.getsid(proc.pid)
    except (psutil.Error, OSError):
        return None
    tagged = environ.get(TAG_ENV_VAR) == tag or any(m in cmdline for m in markers)
    return _Proc(pid=proc.pid, sid=sid, zombie=zombie, tagged=tagged)


class ProcessTracker:
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
        self._tag = tag
        self._markers = [f"{m}{os.sep}" for m in markers]
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
            for candidate in psutil.process_iter()
            if candidate.pid != self._own_pid
            if (proc := _read_proc(candidate, self._tag, self._markers)) is not None
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
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


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
        pending = [p for p in pending if psutil.pid_exists(p)]
        if pending:
            time.sleep(0.05)


def stop_group(
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
                err(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:.0f}s; sending SIGKILL")
    err(f"{name} (pid {proc.pid}) survived SIGKILL; it may need manual cleanup")


def kill_run_processes(state: RunState) -> None:
    """Stop flwr run, then the SuperLink together with every process of the run (SuperExec, Ray)."""
    tracker = state.tracker
    if tracker is not None:
        tracker.stop()
    stop_group(state.flwr_run, "flwr run")
    stop_group(state.gate, "the fleet gate")
    if tracker is None:  # the SuperLink was never started
        return
    pids = tracker.scan()
    if state.superlink is not None and state.superlink.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.superlink.pid, signal.SIGTERM)
    _signal_pids(pids, signal.SIGTERM)
    _wait_gone(pids, TAGGED_GRACE_S)
    stop_group(state.superlink, "flower-superlink")
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
        err(
            f"processes {survivors} from this run survived SIGKILL (expected none); "
            f"check them with `ps -o pid,args -p {','.join(map(str, survivors))}`"
        )


def cleanup(state: RunState) -> None:
    """Release everything the run owns: processes first, then files."""
    try:
        kill_run_processes(state)
    finally:
        for handle in (state.log_handle, state.gate_log):
            if handle is not None:
                handle.close()
        for path in (state.tmp, *state.extra_dirs):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                err(f"could not delete temp dir {path}; delete it by hand")


# --------------------------------------------------------------------------- leftovers


def claim_output_dir(folder: Path, tag: str) -> list[int]:
    """Record that the run tagged `tag` uses `folder`, after stopping what an earlier run
    there left behind; returns the pids stopped.

    A launcher killed with SIGKILL cannot clean up: its SuperLink (own session) keeps running
    and holds the port. Its processes still carry the earlier run's tag, named in RUN_FILE,
    so they are found and stopped here. A launcher that is still alive means another run is
    writing to this folder: that is refused.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_FILE
    earlier: dict = {}
    with contextlib.suppress(OSError, ValueError):
        earlier = json.loads(path.read_text())
    pid, old_tag = int(earlier.get("pid", 0)), str(earlier.get("tag", ""))
    if pid and pid != os.getpid() and _is_alive(pid) and b"fedlora" in _cmdline(pid):
        raise FileExistsError(f"{folder} is in use by another fedlora run (pid {pid}); "
                              f"stop it first or choose another --output-dir")
    stopped = ProcessTracker(old_tag, []).scan() if old_tag else []
    if stopped:
        err(f"stopping {len(stopped)} processes left by an earlier run in {folder} that "
            f"was killed (pids {', '.join(map(str, stopped))})")
        _signal_pids(stopped, signal.SIGTERM)
        _signal_pids(_wait_gone(stopped, TERM_GRACE_S), signal.SIGKILL)
        _wait_gone(stopped, KILL_WAIT_S)
    path.write_text(json.dumps({"tag": tag, "pid": os.getpid()}) + "\n")
    return stopped


def _cmdline(pid: int) -> bytes:
    """A process's command line, NUL-separated ('' when it is gone)."""
    try:
        return "\0".join(psutil.Process(pid).cmdline()).encode()
    except psutil.Error:
        return b""


def release_output_dir(folder: Path, tag: str) -> None:
    """Remove RUN_FILE if it still names the run tagged `tag`."""
    path = folder / RUN_FILE
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(path.read_text())["tag"] == tag:
            path.unlink()
