"""Communication: bytes a client sends per round, against the minimum and the full model.

The client path is followed exactly: the base model is loaded with fedlora.models.load_model,
a LoRA adapter is added with fedlora.adapters.add_lora, its factors are read with
get_lora_state and packed with fedlora.records.to_array_record, and the record's size is
taken with factor_bytes (Flower's ArrayRecord.count_bytes: serialised array bytes plus keys).

- trainable parameters: sum of r x (in + out) over the adapted linear layers, computed from
  the base model's layer shapes, and checked against the number of values actually sent;
- theoretical minimum: trainable parameters x bytes per element of the wire dtype;
- overhead: what Flower adds per array (a NumPy .npy header and the key string);
- full model: every base parameter in its loaded dtype (fp32 on the CPU) and as a 16-bit copy,
  i.e. what a client would send if it shipped the whole model instead of the adapter.

The server sends the same adapter back, so each figure holds per direction.

    python benchmarks/communication.py
    python benchmarks/communication.py --model tiny-llama --ranks 4 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

WIRE_BYTES = {"float32": 4, "float16": 2}


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the default run")
    p.add_argument("--target-modules", default="all-linear", help="LoRA target modules")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="ranks of the sweep")
    return p.parse_args()


def target_shapes(model, targets: list[str]) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer LoRA will adapt."""
    from fedlora.adapters import target_shapes as shapes_of

    return [(k, d) for d, k in shapes_of(model, targets).values()]


def param_bytes(model) -> tuple[int, int]:
    """(number of parameters, bytes in their dtypes); tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def measure(model, adapter: str, rank: int, shapes, wire: str) -> dict:
    """Sizes of what a client sends for one adapter in one wire dtype."""
    from fedlora.adapters import get_lora_state
    from fedlora.records import factor_bytes, to_array_record

    state = get_lora_state(model, adapter)
    record = to_array_record(state, wire)
    expected = sum(rank * (i + o) for i, o in shapes)
    sent_values = sum(v.numel() for v in state.values())
    if sent_values != expected:
        print(f"warning: {sent_values} values sent, {expected} expected", file=sys.stderr)
    minimum = expected * WIRE_BYTES[wire]
    actual = factor_bytes(record)
    return {"rank": rank, "wire": wire, "params": expected, "arrays": len(state),
            "minimum": minimum, "actual": actual, "overhead": actual - minimum,
            "key_bytes": sum(len(k) for k in record)}


def measure_all(args) -> tuple[list[dict], int, int]:
    """Load the model once, add one adapter per rank, measure both wire dtypes for each."""
    from dataclasses import replace

    from fedlora.adapters import add_lora
    from fedlora.config import Settings
    from fedlora.models import load_model

    settings = Settings.from_config({"model": args.model, "lora-rank": args.lora_rank,
                                     "target-modules": args.target_modules})
    model, _, _ = load_model(settings.model)
    n_params, full_bytes = param_bytes(model)
    shapes = target_shapes(model, settings.lora.modules())
    results = []
    for rank in sorted(set(args.ranks) | {args.lora_rank}):
        adapter = f"r{rank}"
        model = add_lora(model, replace(settings.lora, rank=rank), adapter)
        for wire in WIRE_BYTES:
            results.append(measure(model, adapter, rank, shapes, wire))
    return results, n_params, full_bytes


def report(args, results: list[dict], n_params: int, full_bytes: int) -> None:
    """The default-run table, the rank sweep, and the headline ratios."""
    full16 = n_params * 2
    print(f"model {args.model}: {n_params:,} base parameters = {common.fmt_bytes(full_bytes)} "
          f"as loaded, {common.fmt_bytes(full16)} as a 16-bit copy; LoRA on "
          f"{args.target_modules}")

    default = [r for r in results if r["rank"] == args.lora_rank]
    common.print_table(
        ["wire dtype", "trainable params", "arrays", "minimum", "actual",
         "overhead: keys + .npy headers",
         "actual/minimum", "vs full model (loaded)", "vs 16-bit model"],
        [[r["wire"], f"{r['params']:,}", r["arrays"], f"{r['minimum']:,} B",
          f"{r['actual']:,} B", f"{r['key_bytes'] / r['arrays']:.0f} + "
          f"{(r['overhead'] - r['key_bytes']) / r['arrays']:.0f} B/array",
          f"{r['actual'] / r['minimum']:.4f}", f"{100 * r['actual'] / full_bytes:.2f} %",
          f"{100 * r['actual'] / full16:.2f} %"] for r in default],
        title=f"Bytes per client per round (each direction), rank {args.lora_rank}")

    sweep = [r for r in results if r["rank"] in args.ranks]
    common.print_table(
        ["rank", "wire dtype", "trainable params", "actual", "actual/minimum",
         "vs full model (loaded)", "vs 16-bit model"],
        [[r["rank"], r["wire"], f"{r['params']:,}", common.fmt_bytes(r["actual"]),
          f"{r['actual'] / r['minimum']:.4f}", f"{100 * r['actual'] / full_bytes:.2f} %",
          f"{100 * r['actual'] / full16:.2f} %"] for r in sweep],
        title="Rank sweep")

    for r in default:
        print(f"rank {r['rank']} {r['wire']}: actual/minimum = {r['actual'] / r['minimum']:.4f} "
              f"(target <= 1.02); adapter = 1/{full_bytes / r['actual']:.0f} of the full model "
              f"as loaded, 1/{full16 / r['actual']:.0f} of a 16-bit copy")
    print(f"machine: {common.machine()}")


def main() -> None:
    args = parse_args()
    common.quiet_libraries()
    report(args, *measure_all(args))


if __name__ == "__main__":
    main()
