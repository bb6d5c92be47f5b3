"""What a robust merge costs the server at 7B shapes, next to flexlora's factored merge.

For each layer shape of a 7B Llama (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down
4096 x 11008) and 8 clients with ranks 4, 8, 8, 16, 16, 32, 32, 64 (global rank 64), times in
one process, median of the repeats after an untimed warm-up:
- flexlora: fedlora's factored exact average, re-factored by SVD (the baseline);
- krum: the Gram-matrix distances of every pair of delta W plus the scores, then flexlora
  over the n - 1 kept (what `robust=krum` adds is the distance part);
- median and trimmed-mean (f=1): every client's d x k delta W a block of rows at a time, the
  coordinate-wise rule, and the re-factoring SVD (randomised above 1024).
It prints seconds per layer, the ratio to flexlora, and the sum over a 7B model's 224 layers
(32 x the 7 shapes): the server time every round waits for.

    .venv/bin/python benchmarks/robust_merge_cost.py --repeats 1   # about 5 min on 2 cores
    .venv/bin/python benchmarks/robust_merge_cost.py --quick    # 1024 x 1024, 4 clients
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from fedlora.aggregation import ClientUpdate
from fedlora.aggregation import robust as R
from fedlora.methods import get_method

RANKS = (4, 8, 8, 16, 16, 32, 32, 64)
SHAPES = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2),
          "down": ((4096, 11008), 1)}  # shape, layers of it per block; 32 blocks
BLOCKS = 32


def updates(d: int, k: int, ranks: tuple[int, ...]) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(0)
    return [ClientUpdate({"m": (torch.randn(d, r, generator=gen) * 0.01,
                                torch.randn(r, k, generator=gen) * 0.01)}, 100.0 + i)
            for i, r in enumerate(ranks)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return common.median(times)


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one 1024 x 1024 layer, 4 clients")
    args = p.parse_args()
    shapes = {"1024": ((1024, 1024), 1)} if args.quick else SHAPES
    ranks = RANKS[:4] if args.quick else RANKS
    flex = get_method("flexlora")
    print(common.machine(), flush=True)
    print(f"{len(ranks)} clients, ranks {','.join(map(str, ranks))}, global rank 64\n")
    rows, totals = [], {"flexlora": 0.0, "krum": 0.0, "median": 0.0, "trimmed-mean": 0.0}
    for name, ((d, k), per_block) in shapes.items():
        us = updates(d, k, ranks)

        def krum(us=us):
            scores = R.krum_scores(R.squared_distances([u.factors for u in us]), 1)
            keep = R.krum_select(scores, 1)
            flex.merge([us[i] for i in keep], {}, export_rank=64)
        seconds = {
            "flexlora": timed(lambda us=us: flex.merge(us, {}, export_rank=64), args.repeats),
            "krum": timed(krum, args.repeats),
            "median": timed(lambda us=us: R.robust_merge(us, "median", 1, 64), args.repeats),
            "trimmed-mean": timed(lambda us=us: R.robust_merge(us, "trimmed-mean", 1, 64),
                                  args.repeats)}
        layers = per_block * (BLOCKS if not args.quick else 1)
        for rule, s in seconds.items():
            totals[rule] += s * layers
        rows.append([f"{name} {d} x {k}"] + [
            f"{seconds[r]:.3f} s ({seconds[r] / seconds['flexlora']:.1f}x)" for r in totals])
        print(f"  timed {name}", flush=True)
    rows.append([f"a round, {'1 layer' if args.quick else '224 layers'}"] + [
        f"{totals[r]:.0f} s ({totals[r] / totals['flexlora']:.1f}x)" for r in totals])
    common.print_table(["layer", *totals], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
