"""`fedlora mix`: compose trained LoRA adapters of one base model into one PEFT adapter whose
update is sum_i w_i delta W_i, with fixed weights (--weights) or weights searched on a few
examples (--data, LoraHub's way); sources are adapter folders (a run's final/ or rounds/<n>/,
any PEFT LoRA adapter of the same base) or fedsa-lora clients' own models
(<run>/personal/client-<pid>.safetensors)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora mix`."""
    p.add_argument("--adapters", nargs="+", required=True, metavar="ADAPTER",
                   help="two or more LoRA adapters of one base model: adapter folders, or a "
                        "fedsa-lora run's personal/client-<pid>.safetensors (that client's "
                        "own model)")
    p.add_argument("--output-dir", required=True, help="where the mixed PEFT adapter goes")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per adapter: delta W = sum_i w_i delta W_i (default with "
                        "no --data: the mean, 1/n each)")
    p.add_argument("--data", help="a few examples (instruction/output JSON Lines, or any "
                                  "source fedlora reads) to search the weights on instead")
    p.add_argument("--search", choices=("evolution", "gradient"), default="evolution",
                   help="with --data: a seeded (1+1) evolution strategy (gradient-free, as "
                        "LoraHub) or gradient descent on the weights")
    p.add_argument("--steps", type=int, default=40, help="with --data: search steps")
    p.add_argument("--l1", type=float, default=0.05,
                   help="with --data: L1 penalty on the weights, added to the loss (LoraHub: "
                        "0.05)")
    p.add_argument("--seed", type=int, default=0, help="with --data: the search's seed")
    p.add_argument("--device", default="cpu", help="with --data: cpu, cuda or auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")


def weights_of(args: argparse.Namespace, sources: list, out: Path) -> tuple[list[float], dict]:
    """The weights to mix with, and how they were found (for fedlora.json)."""
    from fedlora.data import load_source
    from fedlora.mixing import SEARCHES, example_batches, mixed_model, objective
    from fedlora.models import resolve_device

    n = len(sources)
    if args.data is None:
        weights = args.weights or [1.0 / n] * n
        return weights, {"how": "given" if args.weights else "mean"}
    if args.weights:
        raise ValueError("pass --weights or --data, not both: --data searches the weights")
    if args.steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {args.steps}")
    records = load_source(args.data)
    mixed, tokenizer = mixed_model(sources, resolve_device(args.device))
    batches = example_batches(records, tokenizer, resolve_device(args.device))
    uniform = objective(mixed, batches, [1.0 / n] * n, args.l1)
    print(f"fedlora mix: searching {n} weights on {len(records)} examples ({args.search}, "
          f"{args.steps} steps, seed {args.seed}); objective at the mean weights "
          f"{uniform:.4f}", file=sys.stderr)
    weights, history = SEARCHES[args.search](mixed, batches, args.steps, args.seed, args.l1)
    print(f"fedlora mix: objective {history[-1]:.4f} at weights "
          f"{', '.join(f'{w:.3f}' for w in weights)}", file=sys.stderr)
    return weights, {"how": args.search, "data": str(args.data), "examples": len(records),
                     "steps": args.steps, "seed": args.seed, "l1": args.l1,
                     "objective-at-mean": uniform, "objective": history}


def run(args: argparse.Namespace) -> int:
    """Read the adapters, choose the weights, write the mixed adapter."""
    from fedlora.adapters import lora_config, save_adapter
    from fedlora.config import LoraSettings
    from fedlora.factors import flatten
    from fedlora.mixing import check_sources, mix, read_source

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another "
                              f"--output-dir")
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise ValueError(f"--weights: expected one per adapter ({len(args.adapters)}), got "
                         f"{len(args.weights)}")
    sources = [read_source(spec) for spec in args.adapters]
    check_sources(sources)
    weights, how = weights_of(args, sources, out)
    factors = mix(sources, weights)
    rank = sum(s.rank for s in sources)
    targets = ",".join(sorted({m.rsplit(".", 1)[-1] for m in factors}))
    # scale 1 (alpha = r): the stacked B already carries every adapter's own scale
    config = lora_config(LoraSettings(rank=rank, alpha=float(rank), dropout=0.0,
                                      target_modules=targets), sources[0].base)
    info = {"model": sources[0].base, "mix": {
        "adapters": [s.name for s in sources], "ranks": [s.rank for s in sources],
        "weights": weights, **how}}
    save_adapter(flatten(factors), config, out, extra=info)
    print(json.dumps({"adapter": str(out), "rank": rank, "weights": weights}))
    print(f"mixed adapter: {out}  (rank {rank}; load with PeftModel.from_pretrained, or "
          f"fedlora generate --adapter {out})", file=sys.stderr)
    return 0
