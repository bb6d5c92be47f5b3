"""Every merging strategy on the same non-IID federation with mixed ranks: a table to compare.

Runs `fedlora simulate` once per strategy (real Flower simulations, the same seed, data split
and local-step budget) and prints, per strategy: final eval loss, the exactness figure (mean
over rounds, and the last round), bytes per round and wall time. The built-in arithmetic task
is split by operation with a Dirichlet partitioner (label skew), and clients train ranks
4, 8 and 16 where the method allows (the others use rank 8).

    .venv/bin/python benchmarks/strategy_comparison.py                 # tiny-llama, minutes
    .venv/bin/python benchmarks/strategy_comparison.py --model smollm2-135m --rounds 3
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fedlora.methods import METHODS
from fedlora.outputs import read_metrics, training_rounds


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny-llama")
    p.add_argument("--strategies", nargs="+", default=sorted(METHODS), help="which to run")
    p.add_argument("--num-clients", type=int, default=3, help="virtual clients")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--local-steps", type=int, default=10, help="steps per client per round")
    p.add_argument("--client-ranks", default="4,8,16", help="ranks of heterogeneous runs")
    p.add_argument("--homogeneous-rank", type=int, default=8,
                   help="rank of every client for strategies that need equal ranks")
    p.add_argument("--run-config", default="lr=0.003 dataset-size=600 eval-examples=32 "
                   "partitioner=dirichlet dirichlet-alpha=0.3",
                   help="extra settings shared by every run")
    p.add_argument("--output-dir", default=None, help="keep the runs here (default: a temp dir)")
    return p.parse_args()


def run_one(args, name: str, out: Path) -> tuple[list[dict], float]:
    """One simulation; returns its metrics rows and wall time."""
    heterogeneous = METHODS[name].heterogeneous
    ranks = args.client_ranks if heterogeneous else str(args.homogeneous_rank)
    cmd = [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", args.model,
           "--strategy", name, "--num-clients", str(args.num_clients), "--rounds",
           str(args.rounds), "--local-steps", str(args.local_steps), "--client-ranks", ranks,
           "--output-dir", str(out), "--overwrite", "--run-config", args.run_config]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return [], seconds
    return training_rounds(read_metrics(out)), seconds


def summary(name: str, rows: list[dict], seconds: float, ranks: str) -> list[object]:
    """One table row."""
    if not rows:
        return [name, ranks, "failed", "", "", "", "", f"{seconds:.0f}"]
    exact = [r["exactness"] for r in rows if r.get("exactness") is not None]
    per_round = statistics.mean(r["bytes-up"] + r["bytes-down"] for r in rows)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    return [name, ranks, fmt(rows[-1].get("eval-loss")), fmt(rows[-1].get("train-loss")),
            fmt(statistics.mean(exact)) if exact else "n/a",
            fmt(exact[-1]) if exact else "n/a", common.fmt_bytes(per_round), f"{seconds:.0f}"]


def main() -> None:
    args = parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="fedlora-strategies-"))
    table = []
    for name in args.strategies:
        ranks = args.client_ranks if METHODS[name].heterogeneous else str(args.homogeneous_rank)
        print(f"running {name} (ranks {ranks}) ...", file=sys.stderr, flush=True)
        rows, seconds = run_one(args, name, root / name)
        table.append(summary(name, rows, seconds, ranks))
    print(f"\nmodel {args.model}, {args.num_clients} clients, {args.rounds} rounds x "
          f"{args.local_steps} local steps, run config: {args.run_config}\n")
    common.print_table(["strategy", "client ranks", "final eval loss", "final train loss",
                        "exactness (mean)", "exactness (last)", "bytes / round", "seconds"],
                       table)
    print(f"\nruns kept in {root}\nmachine: {common.machine()}")


if __name__ == "__main__":
    main()
