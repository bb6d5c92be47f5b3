"""Timeline of a deployment ClientApp process, for benchmarks/deployment_overhead.py only.

The benchmark puts this folder on PYTHONPATH of the `fedlora` processes it starts, so every
Python process below them imports it at start-up. In a `flwr-clientapp` process it imports
what the process will import anyway (Flower's ClientApp runner and clients.client_app) right
away and wraps, by attribute, the calls a message runs through, so the process's time splits
into measured pieces:

  started   process start (kernel start time, /proc/self/stat)
  imported  Flower + clients.client_app imported
  handler   the first handler call reaches the model (message and FAB pulled, app loaded)
  loaded    base model + LoRA adapter ready (WORKSPACE.get)
  data      the client's split tokenized (client_data)
  trained   local training done (train_local)
  exited    interpreter exit (the reply and the task status were pushed)

One JSON line per process is appended to $FEDLORA_BENCH_TIMINGS (epoch seconds).

With the resident worker (`fedlora client`'s default) the `flwr-clientapp` process is only a
hand-off (clients.app_guard passes the task to clients.worker): it records its own start and
exit ("handoff"), and the worker records one line per task: task-start (the worker has the
token), handler/loaded/data-start/data/train-start/trained as above, task-end (reply and
context pushed).

In any other process (a simulation's long-lived Ray worker) it only wraps train_local/evaluate
once clients.client_app is imported and appends one line per call. Nothing in fedlora changes:
the wrappers call the originals with the same arguments.
"""

import os
import time

PATH = os.environ.get("FEDLORA_BENCH_TIMINGS")


def _cmdline() -> list[str]:
    with open("/proc/self/cmdline", "rb") as fh:
        return fh.read().decode(errors="replace").split("\0")


def _start_time() -> float:
    """This process's start as epoch seconds (kernel clock ticks since boot)."""
    with open("/proc/self/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as fh:
        boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _record(times: dict) -> None:
    import json

    with open(PATH, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(times) + "\n")


def _wrap(capp, times: dict, per_call: bool) -> None:
    """Time the calls a message runs through, by replacing module/instance attributes."""
    def timed(fn, before, after, kind=None):
        def wrapper(*args, **kwargs):
            if per_call:  # a long-lived worker: one record per call
                times.clear()
                times.update(pid=os.getpid())
            times.setdefault(before, time.time())
            if kind:
                times["kind"] = kind
            try:
                return fn(*args, **kwargs)
            finally:
                times[after] = time.time()
                if per_call:
                    _record(dict(times, kind="simulation-" + (kind or after)))
        return wrapper

    if not per_call:
        capp.WORKSPACE.get = timed(capp.WORKSPACE.get, "handler", "loaded")
        capp.client_data = timed(capp.client_data, "data-start", "data")
    capp.train_local = timed(capp.train_local, "train-start", "trained", "train")
    capp.evaluate = timed(capp.evaluate, "eval-start", "evaluated", "evaluate")


def _clientapp_process() -> None:
    """A deployment flwr-clientapp process: one message, one record at exit."""
    import atexit

    times = {"pid": os.getpid(), "started": _start_time(), "kind": "query"}
    import flwr.supernode.cli  # noqa: F401  (what the flwr-clientapp script imports)
    import clients.client_app as capp

    times["imported"] = time.time()
    _wrap(capp, times, per_call=False)

    def write() -> None:
        times["exited"] = time.time()
        _record(times)

    atexit.register(write)


def _handoff_process() -> None:
    """A resident node's flwr-clientapp process: it only hands the task to the worker."""
    import atexit

    times = {"pid": os.getpid(), "started": _start_time(), "kind": "handoff"}

    def write() -> None:
        times["exited"] = time.time()
        _record(times)

    atexit.register(write)


def _worker_tasks(capp) -> None:
    """The resident worker (clients.worker, run as __main__): one record per task, from its
    pull of the task input to its push of the task output, the ClientApp's calls inside."""
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp as runtime

    current: dict = {}
    _wrap(capp, current, per_call=False)
    pull, push = RuntimeHttpClient.PullTaskInput, runtime.push_task_output

    def timed_pull(*args, **kwargs):  # the task's first request to the runtime API
        current.clear()
        current.update(pid=os.getpid(), kind="query", **{"task-start": time.time()})
        return pull(*args, **kwargs)

    def timed_push(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            current["task-end"] = time.time()
            _record(dict(current, kind="task-" + current.get("kind", "query")))

    RuntimeHttpClient.PullTaskInput, runtime.push_task_output = timed_pull, timed_push


def _after_import_of(target: str, then) -> None:
    """Run `then(module)` once `target` is imported in this process."""
    import importlib.abc
    import importlib.util
    import sys

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_=None):
            if name != target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                then(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if PATH:
    _args = _cmdline()
    if "clients.worker" in _args:
        _after_import_of("clients.client_app", _worker_tasks)
    elif "flwr-clientapp" in _args[:5]:
        if os.environ.get("FEDLORA_WORKER_SOCKET"):
            _handoff_process()
        else:
            _clientapp_process()
    else:
        _after_import_of("clients.client_app", lambda m: _wrap(m, {}, per_call=True))
