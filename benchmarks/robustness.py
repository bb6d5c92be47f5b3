"""What each defence holds: every attack kind against every defence, next to the clean run.

Runs `fedlora simulate` once per (attack, defence) pair on the same federation (the same seed,
data split and local-step budget) and prints, per pair: the final server-side eval loss and
exact-match accuracy on the union of the clients' held-out splits (`server-eval`), their change
from the clean run with the same defence and with none, how many replies the defence dropped or
cut, and the server's screen-and-merge time per round (`merge-seconds`) against the clean run
without defences. Defences: none (both screens off), defaults (max-update-ratio=10,
max-weight-ratio=10), and median, trimmed-mean, krum with the screens off, so that each
rule's own effect shows. Attack "none" rows are what a defence costs when nobody is hostile.

    .venv/bin/python benchmarks/robustness.py                      # SmolLM2-135M, about 75 min
    .venv/bin/python benchmarks/robustness.py --model tiny-llama   # a quick check
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fedlora.config import ATTACKS
from fedlora.outputs import read_metrics, training_rounds

OFF = "max-update-ratio=0 max-weight-ratio=0"
DEFENCES = {
    "none": OFF,
    "defaults": "",
    "median": f"{OFF} robust=median",
    "trimmed-mean": f"{OFF} robust=trimmed-mean",
    "krum": f"{OFF} robust=krum min-replies=4",
}


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), help="attack kinds to run")
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES),
                   help="defences to run")
    p.add_argument("--num-clients", type=int, default=5, help="virtual clients")
    p.add_argument("--attack-clients", type=int, default=1, help="hostile clients")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds")
    p.add_argument("--local-steps", type=int, default=3, help="steps per client per round")
    p.add_argument("--strategy", default="flexlora", help="the strategy every run uses")
    p.add_argument("--run-config", default="fraction-evaluate=0.0 server-eval=24 "
                   "dataset-size=300 min-replies=3",
                   help="extra settings shared by every run")
    p.add_argument("--output-dir", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--reuse", action="store_true",
                   help="read the runs already in --output-dir (finished or failed) instead "
                        "of running them again; run only the missing ones")
    return p.parse_args()


def run_one(args, attack: str, defence: str, out: Path) -> tuple[list[dict], float]:
    """One simulation; its metrics rows and wall time."""
    config = " ".join(part for part in (args.run_config, DEFENCES[defence],
                                        f"attack={attack} attack-clients={args.attack_clients}")
                      if part)
    cmd = [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", args.model,
           "--strategy", args.strategy, "--num-clients", str(args.num_clients), "--rounds",
           str(args.rounds), "--local-steps", str(args.local_steps), "--output-dir", str(out),
           "--overwrite", "--run-config", config]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"{attack} x {defence}: failed (exit {proc.returncode})\n{proc.stderr[-1500:]}",
              file=sys.stderr)
        return [], seconds
    return read_rows(out), seconds


def read_rows(out: Path) -> list[dict]:
    """The metrics rows of a finished run's training rounds (without round 0)."""
    return training_rounds(read_metrics(out))


def summary(rows: list[dict]) -> dict:
    """The figures of one run's table row."""
    if not rows:
        return {}
    last = rows[-1]
    loss = last.get("server-eval-loss")  # metrics.jsonl writes NaN as null
    return {"loss": math.nan if loss is None else loss, "accuracy": last.get("server-accuracy"),
            "dropped": sum(len(r["failures"]) for r in rows),
            "cut": sum(len(r.get("down-weighted", [])) for r in rows),
            "merge": statistics.mean(r.get("merge-seconds", 0.0) for r in rows)}


def difference(got: dict, reference: dict) -> float | None:
    """got's eval loss minus the reference run's (None when either is missing: a NaN loss)."""
    if got.get("loss") is None or reference.get("loss") is None:
        return None
    return got["loss"] - reference["loss"]


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> int:
    args = parse_args()
    root = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp())
    print(common.machine(), flush=True)
    print(f"{args.model}, {args.num_clients} clients ({args.attack_clients} hostile), "
          f"{args.rounds} rounds x {args.local_steps} local steps, {args.strategy}, "
          f"run-config: {args.run_config}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for defence in args.defences:
        for attack in args.attacks:
            out = root / f"{defence}-{attack}"
            if args.reuse and (out / "metrics.jsonl").exists():  # a run without final/ failed
                rows, seconds = (read_rows(out) if (out / "final").exists() else []), 0.0
            else:
                rows, seconds = run_one(args, attack, defence, out)
            results[attack, defence] = summary(rows)
            got = results[attack, defence]
            print(f"  {attack} x {defence}: {seconds:.0f} s, loss "
                  f"{fmt(got.get('loss'), '.4f')}", flush=True)
    base = results.get(("none", "none"), {})
    table = []
    for attack in args.attacks:
        for defence in args.defences:
            got, clean = results.get((attack, defence), {}), results.get(("none", defence), {})
            if not got:
                table.append([attack, defence, "failed"] + [""] * 7)
                continue
            same, bare = difference(got, clean), difference(got, base)
            ratio = got["merge"] / base["merge"] if base.get("merge") else None
            table.append([attack, defence, fmt(got["loss"], ".4f"), fmt(same, "+.4f"),
                          fmt(bare, "+.4f"), fmt(got["accuracy"], ".3f"), got["dropped"],
                          got["cut"], f"{got['merge']:.3f}", fmt(ratio, ".2f") + "x"])
    common.print_table(["attack", "defence", "eval loss", "vs clean, same defence",
                        "vs clean, no defence", "accuracy", "dropped", "cut / not merged",
                        "merge s/round", "merge vs none"], table)
    print(f"\nruns kept in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
