"""Deployment vs simulation: per-round fixed overhead for the same work, and where it goes.

The same run (2 clients, a few rounds of a few local steps, evaluation off by default) goes
through `fedlora simulate` (Flower's Simulation Engine: Ray workers keep one base model
loaded across messages) and through `fedlora server` + 2 `fedlora client` processes on
127.0.0.1 (a real SuperLink and SuperNodes, insecure loopback), twice: with the nodes'
resident ClientApp worker (`--isolation resident`, the default: one process per node runs
every message) and with `--isolation subprocess` (Flower's own: a fresh `flwr-clientapp`
process, imports and model load for every message). Base-model loads are counted from the
nodes' logs ("base model ... loaded").

Per-round wall time is `seconds` of metrics.jsonl (the server's time from sampling to the end
of the round); rounds after the first are the steady state (round 1 also waits for the nodes
and asks their ranks). The deployment round is split by measurement:

- benchmarks/clientapp_timing/sitecustomize.py (put on the nodes' PYTHONPATH) records, in
  every subprocess-mode ClientApp process: process start, imports done, message handled
  (message + app pulled), model load (WORKSPACE.get: base model + LoRA), data (tokenizing the
  client's split), training (train_local), reply pushed and process exit; in resident mode,
  the hand-off process's start and exit and, inside the worker, the same pieces per task;
- per round the two nodes run in parallel, so each piece is the mean over the round's
  train tasks, and the round's time outside them (the SuperNode's poll of the server, the
  SuperExec's poll of the SuperNode, the ServerApp's pulls of replies, aggregation) is
  round seconds - (last exit - first start);
- training in the simulation is timed by the same hook, which wraps train_local in the
  simulation's Ray workers (one record per call); per round the slowest client counts;
- bytes on the wire are bytes-down + bytes-up of metrics.jsonl;
- as a cross-check, imports and model load are also timed in fresh processes on their own.

Everything started here is stopped by PID; afterwards `ps` must show no Flower/Ray process
that carries this run's tag.

    python benchmarks/deployment_overhead.py                       # tiny-llama
    python benchmarks/deployment_overhead.py --model smollm2-135m --quantization 4bit
    FEDLORA_PREQUANTIZED=0 python benchmarks/deployment_overhead.py --model smollm2-135m \\
        --quantization 4bit          # the same without the pre-quantized copy (before)
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from fedlora.runtime import pacing

ROOT = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "clientapp_timing"
TAG = "FEDLORA_BENCH_SESSION"
ARMS = ("simulation", "resident", "subprocess")  # subprocess: Flower's process per message
PROCESS_NAMES = ("flower-", "flwr-", "ray::", "raylet", "gcs_server", "fedlora.cli.main")

# A fresh process: what a flwr-clientapp process imports, then what a train message loads.
ISOLATED = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import flwr.supernode.cli
import clients.client_app as capp
t1 = time.perf_counter()
from fedlora.methods import load_settings
settings = load_settings(json.loads(sys.argv[1]), {"partition-id": 0, "num-partitions": 2})
slot = capp.WORKSPACE.get(settings.model, settings.lora, settings.train)
t2 = time.perf_counter()
capp.client_data(settings, slot, 0, 2)
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "model-load": t2 - t1, "data": t3 - t2}))
"""


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny-llama")
    p.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--fraction-evaluate", type=float, default=0.0,
                   help="0 = no evaluate messages (each costs deployment another process)")
    p.add_argument("--run-config", default="dataset-size=200 max-length=64",
                   help="more settings, the same for both runs")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process timings (median)")
    p.add_argument("--only", choices=list(ARMS), help="run one arm only")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def run_config(args) -> dict:
    from fedlora.cli.runconfig import parse_run_config

    return {"model": args.model, "quantization": args.quantization, "device": "cpu",
            "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "fraction-evaluate": args.fraction_evaluate, **parse_run_config(args.run_config)}


def config_flag(config: dict) -> list[str]:
    from fedlora.cli.client import format_value

    return ["--run-config", " ".join(f"{k}={format_value(v)}" for k, v in config.items())]


def env(session: str, timings: Path | None = None) -> dict[str, str]:
    """The environment of our processes: the cleanup tag and, with `timings`, the hook."""
    extra = {} if timings is None else {
        "FEDLORA_BENCH_TIMINGS": str(timings),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", TAG: session,
            **extra}


def fedlora(args: list[str], log: Path, environ: dict[str, str]) -> subprocess.Popen:
    """A `fedlora ...` process logging to a file; stopped by PID in `stop`."""
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli.main", *args], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ)


def stop(procs: list[subprocess.Popen], grace: float = 60.0) -> None:
    """SIGTERM the live ones by PID (fedlora stops its SuperLink/SuperNode children), give
    them `grace` seconds together, SIGKILL what is left, reap all."""
    live = [proc for proc in procs if proc.poll() is None]
    for proc in live:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tagged(session: str) -> list[int]:
    """PIDs of live processes whose environment carries this session's tag."""
    marker, pids = f"{TAG}={session}".encode(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def leftovers(session: str, timeout: float = 30.0) -> tuple[list[int], list[str]]:
    """(tagged PIDs still alive after `timeout` s, `ps` lines of any Flower/Ray process)."""
    deadline = time.monotonic() + timeout
    while (left := tagged(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return left, [line.strip() for line in ps.splitlines()
                  if any(n in line for n in PROCESS_NAMES) and "ps -eo" not in line]


def results(out: Path, timings: Path, wall: float, logs: list[Path] = ()) -> dict:
    """metrics.jsonl rows, the hook's timing records and the base-model loads of one run."""
    from fedlora.outputs import read_metrics, training_rounds

    records = ([json.loads(line) for line in timings.read_text().splitlines()]
               if timings.exists() else [])
    loads = [log.read_text(errors="replace").count("] base model ") for log in logs]
    return {"wall": wall, "rows": training_rounds(read_metrics(out)), "processes": records,
            "loads": loads}


def simulation(config: dict, work: Path, session: str) -> dict:
    out, timings = work / "sim", work / "simulation-timings.jsonl"
    with common.stopwatch() as wall:
        proc = fedlora(["simulate", "--num-clients", "2", "--cpus-per-client", "1",
                        "--output-dir", str(out), *config_flag(config)], work / "sim.log",
                       env(session, timings))
        try:
            code = proc.wait(timeout=1800)
        finally:
            stop([proc])
    if code != 0:
        raise SystemExit(f"fedlora simulate failed ({code}):\n" +
                         (work / "sim.log").read_text()[-3000:])
    return results(out, timings, wall["seconds"])


def deployment(config: dict, work: Path, session: str, isolation: str) -> dict:
    from fedlora.cli.client import free_port

    work = work / isolation
    work.mkdir()
    out, port, timings = work / "deploy", free_port(), work / "clientapp-timings.jsonl"
    nodes_env = env(session, timings)
    with common.stopwatch() as wall:
        server = fedlora(["server", "--address", f"127.0.0.1:{port}", "--min-nodes", "2",
                          "--output-dir", str(out), *config_flag(config)],
                         work / "server.log", env(session))
        nodes = [fedlora(["client", "--server", f"127.0.0.1:{port}", "--insecure",
                          "--partition-id", str(i), "--num-partitions", "2",
                          "--isolation", isolation], work / f"node{i}.log", nodes_env)
                 for i in range(2)]
        try:
            code = server.wait(timeout=1800)
        finally:
            stop([server, *nodes])
    if code != 0:
        raise SystemExit(f"fedlora server failed ({code}):\n" +
                         (work / "server.log").read_text()[-3000:])
    return results(out, timings, wall["seconds"], [work / f"node{i}.log" for i in range(2)])


def isolated(config: dict, repeats: int) -> dict:
    """Median imports / model load / data of a fresh process (the first run is dropped: it
    may build a cache, e.g. the pre-quantized copy, that every later process reads)."""
    runs = []
    for _ in range(repeats + 1):
        proc = subprocess.run([sys.executable, "-c", ISOLATED, json.dumps(config)], cwd=ROOT,
                              capture_output=True, text=True, env=env("isolated"), timeout=600)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]} | {
        "first-model-load": runs[0]["model-load"]}


def steady(rows: list[dict]) -> list[dict]:
    return rows[1:] or rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def per_round(records: list[dict], kind: str, clients: int = 2) -> list[list[dict]]:
    """The hook's training records grouped by round (each round trains every client once)."""
    train = sorted((p for p in records if p["kind"] == kind), key=lambda p: p["train-start"])
    return [train[i:i + clients] for i in range(0, len(train), clients)]


def training(run: dict, kind: str) -> list[float]:
    """Per round: the slowest client's training seconds (the nodes train in parallel)."""
    return [max(p["trained"] - p["train-start"] for p in pair)
            for pair in per_round(run["processes"], kind)]


# (piece, from, to) over one train task's record; "started"/"exited" are its process's
SUBPROCESS_PIECES = (
    ("process start + imports", "started", "imported"),
    ("message + app pulled", "imported", "handler"), ("model load", "handler", "loaded"),
    ("data (tokenize split)", "data-start", "data"), ("training", "train-start", "trained"),
    ("reply pushed + exit", "trained", "exited"))
RESIDENT_PIECES = (  # "started"/"exited": the hand-off process around the worker's task
    ("hand-off process start -> worker has the task", "started", "task-start"),
    ("message + context pulled, settings", "task-start", "handler"),
    ("model load (cached)", "handler", "loaded"), ("data (cached split)", "data-start", "data"),
    ("training", "train-start", "trained"), ("reply + context pushed", "trained", "task-end"),
    ("hand-off process exit", "task-end", "exited"))


def resident_tasks(procs: list[dict]) -> list[dict]:
    """The worker's train tasks, each with the start and exit of the hand-off process whose
    lifetime contains it."""
    handoffs = [p for p in procs if p["kind"] == "handoff"]
    tasks = []
    for t in (p for p in procs if p["kind"] == "task-train"):
        h = next((h for h in handoffs
                  if h["started"] <= t["task-start"] and h["exited"] >= t["task-end"]),
                 {"started": t["task-start"], "exited": t["task-end"]})
        tasks.append({**t, "kind": "train", "started": h["started"], "exited": h["exited"]})
    return tasks


def split_round(rows: list[dict], tasks: list[dict], pieces: tuple) -> dict:
    """Mean seconds per piece of a steady-state deployment round (rounds 2..)."""
    spent: dict[str, list[float]] = {name: [] for name, _, _ in pieces}
    spent["outside the ClientApp processes"] = []
    for row, pair in list(zip(rows, per_round(tasks, "train")))[1:]:
        for task in pair:
            for name, begin, end in pieces:
                spent[name].append(task[end] - task[begin])
        span = max(p["exited"] for p in pair) - min(p["started"] for p in pair)
        spent["outside the ClientApp processes"].append(row["seconds"] - span)
    return {k: mean(v) for k, v in spent.items()}


TRAIN_KIND = {"simulation": "simulation-train", "resident": "task-train",
              "subprocess": "train"}


def report(args, config, runs: dict, iso) -> dict:
    result = {"config": config, "machine": common.machine(), "isolated": iso,
              "prequantized": os.environ.get("FEDLORA_PREQUANTIZED", "1")}
    table = []
    for name, run in runs.items():
        rows = steady(run["rows"])
        sec = mean(r["seconds"] for r in rows)
        train = mean(steady(training(run, TRAIN_KIND[name])))
        wire = mean(r.get("bytes-down", 0) + r.get("bytes-up", 0) for r in rows)
        loads = "+".join(map(str, run["loads"])) if run["loads"] else "-"
        result[name] = {"round-1": run["rows"][0]["seconds"], "round": sec,
                        "train-seconds": train, "overhead": sec - train, "bytes": wire,
                        "wall": run["wall"], "rounds": [r["seconds"] for r in run["rows"]],
                        "model-loads-per-node": run["loads"]}
        table.append([name, f"{run['rows'][0]['seconds']:.1f}", f"{sec:.1f}", f"{train:.2f}",
                      f"{sec - train:.1f}", loads, common.fmt_bytes(wire),
                      f"{run['wall']:.0f}"])
    common.print_table(["engine", "round 1 s", "round s (2..)", "training s (slowest client)",
                        "overhead s", "model loads per node", "bytes / round",
                        "command wall s"], table,
                       f"Per-round time, {args.model} ({args.quantization}), 2 clients, "
                       f"{args.rounds} rounds x {args.local_steps} local steps")
    sim = result.get("simulation")
    for name in ("resident", "subprocess"):
        if sim and name in result:
            ratio = result[name]["round"] / sim["round"]
            result[name]["ratio-to-simulation"] = ratio
            print(f"{name} deployment / simulation round time: {ratio:.2f}x; fixed overhead "
                  f"(round - slowest training) {result[name]['overhead']:.1f} s vs "
                  f"{sim['overhead']:.1f} s")
    if "resident" in result and "subprocess" in result:
        print(f"resident / subprocess round time: "
              f"{result['resident']['round'] / result['subprocess']['round']:.2f}x")
    print()
    for name in ("subprocess", "resident"):
        run = runs.get(name)
        if not run or not run["processes"] or len(run["rows"]) < 2:
            continue
        tasks = resident_tasks(run["processes"]) if name == "resident" else run["processes"]
        pieces = split_round(run["rows"], tasks,
                             RESIDENT_PIECES if name == "resident" else SUBPROCESS_PIECES)
        result[name]["split"] = pieces
        total = mean(r["seconds"] for r in steady(run["rows"]))
        common.print_table(["piece of a deployment round", "seconds (mean per node)",
                            "share of the round"],
                           [[k, f"{v:.2f}", f"{100 * v / total:.0f} %"]
                            for k, v in pieces.items()],
                           f"Deployment round ({name}), measured inside the ClientApp processes")
    waits = (pacing.NODE_POLL_S, pacing.SUPEREXEC_POLL_S, pacing.REPLY_POLL_S)
    print(f"Polling intervals in these runs (fedlora/runtime/pacing.py): an idle node asks the "
          f"server every {waits[0]} s (fedlora client --poll-interval; Flower's own: 3 s), the "
          f"SuperExec asks its node every {waits[1]} s (Flower: 1 s), the ServerApp pulls "
          f"replies every {waits[2]} s (Flower: 3 s); expected wait per message, half of "
          f"each: about {sum(waits) / 2:.2f} s\n")
    common.print_table(["fresh process, measured alone", "seconds (median)"],
                       [["imports (Flower ClientApp runner + clients.client_app)",
                         f"{iso['imports']:.2f}"],
                        ["model load (base + LoRA), cache warm", f"{iso['model-load']:.2f}"],
                        ["model load, first process", f"{iso['first-model-load']:.2f}"],
                        ["data (tokenize split)", f"{iso['data']:.2f}"]])
    print(f"FEDLORA_PREQUANTIZED={result['prequantized']}; machine: {result['machine']}")
    return result


def main() -> int:
    args = parse_args()
    config = run_config(args)
    session = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        work = Path(tmp)
        try:
            iso = isolated(config, args.repeats)
            runs = {}
            for arm in ARMS:
                if args.only in (None, arm):
                    runs[arm] = (simulation(config, work, session) if arm == "simulation"
                                 else deployment(config, work, session, arm))
        finally:
            left, ps = leftovers(session)
            print(f"\nleft-over processes of this run: {left or 'none'}; Flower/Ray "
                  f"processes on the machine now: {len(ps)}")
            for line in ps:
                print("  ", line[:160])
        result = report(args, config, runs, iso)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
