"""Every PEFT method (`--peft`) side by side on one model, task and budget: what it trains,
what it sends, what it costs a client and what it reaches.

Per method, two measurements:

1. a federated run: `fedlora simulate --peft NAME` with the README's default settings (2
   clients, the built-in unit conversions, 3 rounds x 10 local steps, the same seed and data
   for every method) and the method's learning rate (`--lrs`); from its metrics.jsonl:
   exact-match accuracy on the 64 held-out questions before training (round 0: the base
   model) and after the last round, eval loss, and the bytes each client sent per round;
2. a client on its own (a subprocess per method, so that memory peaks do not mix): the
   trainable parameters, training tokens/s over `--measure-steps` steps of the same data,
   and the peak resident memory of training above the loaded model.

    .venv/bin/python benchmarks/peft_methods.py --output-dir results/peft-methods
    .venv/bin/python benchmarks/peft_methods.py --model tiny-llama --rounds 1 \\
        --local-steps 2 --output-dir /tmp/peft   # a quick check

Writes <output-dir>/results.json (every figure, with each run folder kept under
<output-dir>/<method>/) and <output-dir>/results.md (the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common

from fedlora.outputs import read_metrics, training_rounds

# one learning rate per method, not tuned (prompt tuning at 3e-2 reached 0 accuracy in a probe)
DEFAULT_LRS = ("lora=1e-3,dora=1e-3,ia3=1e-2,prompt-tuning=1e-1,p-tuning=1e-3,"
               "prefix-tuning=1e-2,p-tuning-v2=1e-2,adapter=1e-3")


def parse_args(argv: list[str] | None = None):
    from fedlora.adapters import PEFT_METHODS

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(sorted(PEFT_METHODS)),
                   help="PEFT methods, comma-separated")
    p.add_argument("--lrs", default=DEFAULT_LRS,
                   help="learning rate per method (method=lr, comma-separated); a method not "
                        "named gets the default lr")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-steps", type=int, default=8,
                   help="training steps of the client-on-its-own measurement")
    p.add_argument("--output-dir", type=Path, default=Path("results/peft-methods"))
    # the client-on-its-own measurement, run by this script in a subprocess per method
    p.add_argument("--measure", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def lr_of(args, method: str) -> float | None:
    pairs = dict(item.split("=") for item in args.lrs.split(",") if item)
    return float(pairs[method]) if method in pairs else None


# ---------------------------------------------------------------- 1. the federated run


def federated(args, method: str, out: Path) -> dict:
    """`fedlora simulate --peft method` at the defaults; its figures from metrics.jsonl."""
    lr = lr_of(args, method)
    command = [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", args.model,
               "--peft", method, "--rounds", str(args.rounds), "--local-steps",
               str(args.local_steps), "--seed", str(args.seed), "--output-dir", str(out),
               "--overwrite", "--run-config", f"lr={lr}" if lr else ""]
    with common.stopwatch() as t:
        subprocess.run(command, check=True)
    rows = read_metrics(out)
    trained = training_rounds(rows)
    clients = [c for r in trained for c in r["clients"]]
    return {"lr": lr, "run": str(out), "seconds": t["seconds"],
            "base-accuracy": rows[0].get("accuracy"), "accuracy": trained[-1].get("accuracy"),
            "base-eval-loss": rows[0].get("eval-loss"), "eval-loss": trained[-1].get("eval-loss"),
            "bytes-up-per-client-round": sum(c["bytes-up"] for c in clients) / len(clients),
            "train-loss": [r["train-loss"] for r in trained]}


# ---------------------------------------------------------------- 2. one client on its own


def measure(args) -> dict:
    """In this process: load the model, add the method, train `measure-steps` steps."""
    common.quiet_libraries()
    from dataclasses import replace

    from fedlora.adapters import Workspace
    from fedlora.data import client_records, tokenize_records
    from fedlora.methods import load
    from fedlora.train import RoundPlan, train_local
    from fedlora.train.loop import trainable_parameters

    settings, _ = load({"model": args.model, "peft": args.measure, "lr": args.lr,
                        "device": "cpu", "seed": args.seed})
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    train, _ = client_records(settings.data, 0, 2, args.seed)
    examples = tokenize_records(train, slot.tokenizer, settings.train.max_length,
                                settings.data.packing)
    params = trainable_parameters(slot.model, slot.adapter)
    loaded = common.peak_rss_mib()
    result = train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                         replace(settings.train, local_steps=args.measure_steps),
                         RoundPlan(seed=args.seed), desc=args.measure)
    return {"trainable-parameters": sum(p.numel() for p in params),
            "tokens-per-second": result.tokens / result.seconds,
            "peak-rss-mib": common.peak_rss_mib(), "rss-after-load-mib": loaded,
            "training-peak-above-model-mib": common.peak_rss_mib() - loaded}


def client_alone(args, method: str) -> dict:
    lr = lr_of(args, method) or 1e-3
    command = [sys.executable, __file__, "--model", args.model, "--measure", method,
               "--lr", str(lr), "--seed", str(args.seed), "--measure-steps",
               str(args.measure_steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the table


def table(results: dict[str, dict]) -> str:
    lines = ["| method | lr | trainable parameters | KB sent per client per round | client "
             "tokens/s | training memory above the model (MiB) | accuracy: base -> "
             "federated | eval loss: base -> federated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['lr'] or 'default'} | {r['trainable-parameters']:,} | "
            f"{r['bytes-up-per-client-round'] / 1e3:,.1f} | {r['tokens-per-second']:.0f} | "
            f"{r['training-peak-above-model-mib']:.0f} | {r['base-accuracy']:.3f} -> "
            f"{r['accuracy']:.3f} | {r['base-eval-loss']:.3f} -> {r['eval-loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for method in args.methods.split(","):
        print(f"== {method}", file=sys.stderr, flush=True)
        results[method] = {**federated(args, method, args.output_dir / method),
                           **client_alone(args, method)}
        path.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.output_dir / "results.md").write_text(
        f"{common.machine()}\n\nmodel {args.model}, {args.rounds} rounds x {args.local_steps} "
        f"local steps, seed {args.seed}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
