"""Simulation scaling: peak memory and time per round against the number of virtual clients.

Runs a real `fedlora simulate` once per client count (default 2, 8, 32, 128), sampling
min(10, N) clients per round for training and for evaluation, every client holding the same
number of records (dataset-size = records-per-client x N). While a run goes, the resident
memory of its whole process tree (the simulate process, the SuperLink, the SuperExec,
flwr-simulation, Ray's gcs_server/raylet/agents and its worker processes) is sampled from
/proc every --interval seconds; the table shows the peak of the summed RSS (shared pages
counted once per process), the peak of the summed PSS (shared pages split, closer to what the
machine really spends) and the most Ray ClientApp workers seen at once. Time per round is
the `seconds` of metrics.jsonl, averaged over the rounds after the first (the first also
loads the base model in each worker).

Targets (issue #5): memory at 128 clients within 1.5x of memory at 2; time per round
proportional to the clients sampled, so equal for 32 and 128 clients (10 sampled each).
After every run the script checks that none of the run's processes is still alive.

    .venv/bin/python benchmarks/simulation_scaling.py                  # tiny-llama, minutes
    .venv/bin/python benchmarks/simulation_scaling.py --clients 2 8 --rounds 2
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

from fedlora.outputs import read_metrics, training_rounds

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024  # /proc/<pid>/statm counts pages


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny-llama")
    p.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32, 128],
                   help="virtual client counts, one simulation each")
    p.add_argument("--sampled", type=int, default=10, help="clients sampled per round (at most)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per simulation")
    p.add_argument("--local-steps", type=int, default=2, help="steps per client per round")
    p.add_argument("--records-per-client", type=int, default=20,
                   help="dataset-size is this times the number of clients")
    p.add_argument("--dataset", default="builtin:arithmetic",
                   help="the federation's data: 20 x 512 records need a task with that many "
                        "distinct questions (builtin:units, the run default, has 3,600)")
    p.add_argument("--run-config", default="batch-size=2 max-length=64 eval-examples=4",
                   help="extra settings shared by every run")
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling period (s)")
    p.add_argument("--output-dir", default=None, help="keep the runs here (default: a temp dir)")
    return p.parse_args()


# ---------------------------------------------------------------- the process tree in /proc


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def read_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * PAGE_KIB
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            pss = next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0, 0
    return rss, pss


def cmdline(pid: int) -> str:
    """A process's command line ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_tree(root: int, sessions: set[int]) -> dict[int, tuple[int, int, int]]:
    """`root` and every process below it, plus every member of a session one of them started
    (Ray and Flower start theirs in new sessions; a process whose parent exited is reparented
    to init but keeps its session). `sessions` gathers those session ids across calls."""
    table = {pid: st for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
             if (st := proc_stat(pid)) is not None}
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, st in table.items() if st[0] == parent and pid not in tree]
        tree.update(children)
        frontier += children
    sessions.update(table[pid][1] for pid in tree if pid in table and table[pid][1] != 0)
    tree.update(pid for pid, st in table.items() if st[1] in sessions)
    return {pid: table[pid] for pid in tree if pid in table}


@dataclass
class TreeSampler:
    """Samples the summed memory of a process tree in a thread until stopped."""

    root: int
    interval: float
    peak_rss: int = 0
    peak_pss: int = 0
    peak_workers: int = 0
    peak_processes: int = 0
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time (to spot reuse)
    sessions: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        """One pass over the tree: sums, peaks, and the processes seen."""
        tree = run_tree(self.root, self.sessions)
        sizes = [read_kib(pid) for pid in tree]
        self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
        self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
        workers = sum("ClientAppActor" in cmdline(pid) for pid in tree)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_processes = max(self.peak_processes, len(tree))
        self.seen.update({pid: st[2] for pid, st in tree.items()})

    def loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def leftovers(self) -> list[str]:
        """Processes of the run that are still alive (same pid and start time)."""
        alive = [pid for pid, start in self.seen.items()
                 if (st := proc_stat(pid)) is not None and st[2] == start]
        return [f"{pid} {cmdline(pid)[:100]}" for pid in alive]


# ---------------------------------------------------------------- one simulation


def simulate_command(args, n: int, out: Path) -> list[str]:
    """The `fedlora simulate` command for `n` clients, min(sampled, n) of them per round."""
    k = min(args.sampled, n)
    run_config = (f"fraction-train={k / n!r} min-train-nodes={k} fraction-evaluate={k / n!r} "
                  f"min-evaluate-nodes={k} min-available-nodes={n} "
                  f"dataset-size={args.records_per_client * n} {args.run_config}")
    return [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", args.model,
            "--num-clients", str(n), "--rounds", str(args.rounds), "--local-steps",
            str(args.local_steps), "--dataset", args.dataset, "--output-dir", str(out),
            "--overwrite", "--run-config", run_config]


def run_one(args, n: int, out: Path) -> dict:
    """One simulation under the sampler; its peaks, times and leftovers."""
    cmd = simulate_command(args, n, out)
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "wb") as fh:  # its own session: the tree below it is the run, nothing else
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler(proc.pid, args.interval)
    thread = threading.Thread(target=sampler.loop, daemon=True)
    thread.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # its own session missed the Ctrl-C: fedlora cleans up on SIGTERM
        proc.terminate()
        proc.wait()
        raise
    wall = time.perf_counter() - started
    sampler.stop()
    thread.join()
    time.sleep(1.0)  # fedlora has stopped its processes before exiting; give /proc a moment
    rows = training_rounds(read_metrics(out)) if code == 0 else []
    if code != 0:
        print(f"{n} clients: failed (exit {code}); log: {log}", file=sys.stderr)
    later = [r["seconds"] for r in rows[1:]] or [r["seconds"] for r in rows]
    return {"n": n, "sampled": min(args.sampled, n), "code": code, "wall": wall,
            "rss": sampler.peak_rss / 1024, "pss": sampler.peak_pss / 1024,
            "workers": sampler.peak_workers, "processes": sampler.peak_processes,
            "round1": rows[0]["seconds"] if rows else float("nan"),
            "per_round": statistics.mean(later) if later else float("nan"),
            "replied": [r.get("clients-replied") for r in rows],
            "leftovers": sampler.leftovers()}


# ---------------------------------------------------------------- report


def table_rows(results: list[dict]) -> list[list[object]]:
    """One row per client count, with per-round time per sampled client."""
    return [[r["n"], r["sampled"], "/".join(map(str, r["replied"])) or "failed",
             f"{r['rss']:.0f}", f"{r['pss']:.0f}", r["workers"], r["processes"],
             f"{r['round1']:.1f}", f"{r['per_round']:.2f}",
             f"{r['per_round'] / r['sampled']:.3f}", f"{r['wall']:.0f}"] for r in results]


def print_ratios(results: list[dict]) -> None:
    """Memory of the largest count over the smallest; time per round of each run over the
    largest one's, next to the ratio of their sampled clients (what proportional predicts)."""
    ok = [r for r in results if r["code"] == 0]
    if len(ok) < 2:
        return
    small, large = ok[0], ok[-1]
    print(f"peak memory {large['n']} / {small['n']} clients: RSS sum "
          f"{large['rss'] / small['rss']:.2f}x, PSS sum {large['pss'] / small['pss']:.2f}x "
          f"(target <= 1.5x)")
    for r in ok:
        print(f"time per round {r['n']:>4} clients / {large['n']} clients: "
              f"{r['per_round'] / large['per_round']:.2f}x, sampled clients "
              f"{r['sampled']}/{large['sampled']} = {r['sampled'] / large['sampled']:.2f}x")


def main() -> None:
    args = parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="fedlora-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.clients:
        print(f"running {n} clients ...", file=sys.stderr, flush=True)
        results.append(run_one(args, n, root / f"clients-{n}"))
        for line in results[-1]["leftovers"]:
            print(f"  LEFTOVER process after {n} clients: {line}", file=sys.stderr)
    print(f"\nmodel {args.model}, {args.rounds} rounds x {args.local_steps} local steps, "
          f"min({args.sampled}, N) clients sampled per round (train and evaluate), "
          f"{args.records_per_client} records per client, run config: {args.run_config}\n")
    common.print_table(
        ["clients", "sampled", "replied per round", "peak RSS sum MiB", "peak PSS sum MiB",
         "Ray workers", "processes", "round 1 s", "s / round (2..)", "s / round / sampled",
         "wall s"], table_rows(results))
    print_ratios(results)
    left = sum(len(r["leftovers"]) for r in results)
    print(f"processes left after the runs: {left}")
    print(f"\nruns kept in {root}\nmachine: {common.machine()}")


if __name__ == "__main__":
    main()
