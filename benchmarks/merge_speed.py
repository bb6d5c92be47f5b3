"""Merge speed: factored vs dense FlexLoRA on one layer, and whole-model merge time per strategy.

1. FlexLoRA on one layer (d x k), 8 clients with ranks 4, 8, 8, 16, 16, 32, 32, 64, global
   rank 64. "factored" is fedlora's merge (stack, QR of both sides, SVD of the 180 x 180 core);
   "dense" is the paper's recipe written here as a reference: form W = sum_i p_i B_i A_i
   (d x k), take its full SVD, keep the top 64. Both compute in float64. Each variant runs in
   its own child process: time is the median of the repeats after an untimed warm-up (see
   `run_child`); memory is measured, not computed: the growth of the child's resident set,
   its peak (VmHWM) at the end minus its resident size (VmRSS) once the inputs exist, so it
   counts everything torch and LAPACK allocate. The dense child then checks the two results
   against each other: the relative Frobenius difference of the two rank-64 products and the
   largest relative difference of the top 64 singular values.
2. One round's merge of a 7B-shaped adapter set: 32 layers x {q, k, v, o: 4096 x 4096;
   gate, up: 4096 -> 11008; down: 11008 -> 4096}, 8 clients at rank 16, or ranks 4..64 for the
   rank-heterogeneous strategies, for every registered strategy (fedlora's factored code,
   one `merge` call over all modules, as the server makes it). The clients' factors of one
   layer are reused by all layers (same values, separate modules) to keep memory small; that
   does not change the work a merge does.

    .venv/bin/python benchmarks/merge_speed.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/merge_speed.py --quick    # 2048 x 2048 and 2 layers only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from fedlora.aggregation import ClientUpdate, Factors
from fedlora.methods import METHODS, get_method, strategies_for

MIXED_RANKS = (4, 8, 8, 16, 16, 32, 32, 64)
SHAPES = ((2048, 2048), (4096, 4096), (4096, 11008))
LAYER = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
         "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
         "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
         "mlp.down_proj": (4096, 11008)}  # (d = out features, k = in features)
GLOBAL_RANK = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only the 2048 x 2048 layer in part 1, and 2 layers in part 2")
    p.add_argument("--layers", type=int, default=32, help="decoder layers in part 2")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each factored merge")
    p.add_argument("--dense-repeats", type=int, default=1,
                   help="timed runs of each dense merge (one 4096 x 11008 SVD takes ~1 min)")
    p.add_argument("--round-repeats", type=int, default=3,
                   help="timed runs of each whole-model merge (part 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default, one per core)")
    p.add_argument("--skip-dense", action="store_true", help="part 2 only")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec of one part-1 measurement
    return p.parse_args()


# ---------------------------------------------------------------- inputs


def client_updates(shapes: dict[str, tuple[int, int]], ranks: tuple[int, ...], seed: int = 0,
                   a_shared: Factors | None = None) -> list[ClientUpdate]:
    """One update per rank with random factors and 50..500 examples; A from `a_shared` if given."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for r in ranks:
        factors = {m: (torch.randn(d, r, generator=gen) / d**0.5,
                       torch.randn(r, k, generator=gen) / k**0.5) for m, (d, k) in shapes.items()}
        if a_shared is not None:
            factors = {m: (b, a_shared[m][1][:r]) for m, (b, _) in factors.items()}
        updates.append(ClientUpdate(factors, int(torch.randint(50, 501, (1,), generator=gen))))
    return updates


def replicate(updates: list[ClientUpdate], layers: int) -> list[ClientUpdate]:
    """The same per-layer factors under `layers` layers' module names (tensors shared)."""
    return [ClientUpdate({f"model.layers.{i}.{m}": f for i in range(layers)
                          for m, f in u.factors.items()}, u.weight) for u in updates]


# ---------------------------------------------------------------- part 1: one layer


def dense_flexlora(updates: list[ClientUpdate], rank: int) -> tuple[Factors, torch.Tensor]:
    """Reference FlexLoRA: dense W = sum p_i B_i A_i, full SVD, top `rank` (float64)."""
    total = sum(u.weight for u in updates)
    out: Factors = {}
    for module in updates[0].factors:
        w = sum((u.weight / total) * (u.factors[module][0].double() @ u.factors[module][1].double())
                for u in updates)
        u_, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        out[module] = (u_[:, :rank] * root, root[:, None] * vh[:rank])
    return out, s


def factored_flexlora(updates: list[ClientUpdate], rank: int) -> tuple[Factors, torch.Tensor]:
    """fedlora's FlexLoRA merge."""
    result = get_method("flexlora").merge(updates, {}, export_rank=rank)
    spectrum = next(iter(result.info["singular_values"].values()))
    return result.global_factors, torch.tensor(spectrum, dtype=torch.float64)


VARIANTS: dict[str, Callable[[list[ClientUpdate], int], tuple[Factors, torch.Tensor]]] = {
    "factored": factored_flexlora, "dense": dense_flexlora}


def compare(dense: tuple[Factors, torch.Tensor], updates: list[ClientUpdate]) -> dict:
    """Relative differences between the dense result and the factored one."""
    fact = factored_flexlora(updates, GLOBAL_RANK)
    (bd, ad), (bf, af) = next(iter(dense[0].values())), next(iter(fact[0].values()))
    pd, pf = bd.double() @ ad.double(), bf.double() @ af.double()
    sd, sf = dense[1][:GLOBAL_RANK], fact[1][:GLOBAL_RANK]
    return {"product_rel_diff": float(torch.linalg.norm(pd - pf) / torch.linalg.norm(pf)),
            "sv_rel_diff": float(((sd - sf).abs() / sf).max())}


def run_child(spec: dict) -> None:
    """Measure one variant on one shape in this (child) process; print one JSON line."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    updates = client_updates({"layer": (spec["d"], spec["k"])}, MIXED_RANKS)
    merge = VARIANTS[spec["variant"]]
    # Untimed warm-up (LAPACK and thread-pool start-up, first-touch pages): the factored merge
    # on the real problem; the dense one on a 512 x 512 layer, since a full-size run costs a
    # whole extra SVD and its one-time costs are a negligible part of it.
    warm = updates if spec["variant"] == "factored" else client_updates(
        {"layer": (512, 512)}, MIXED_RANKS)
    before = common.rss_mib()  # inputs built; the peak below covers warm-up and timed runs
    merge(warm, GLOBAL_RANK)
    times = []
    for _ in range(spec["repeats"]):
        with common.stopwatch() as t:
            result = merge(updates, GLOBAL_RANK)
        times.append(t["seconds"])
    out = {"seconds": common.median(times), "peak_mib": common.peak_rss_mib() - before}
    if spec["variant"] == "dense":
        out.update(compare(result, updates))
    print(json.dumps(out))


def measure(variant: str, d: int, k: int, repeats: int, threads: int) -> dict:
    """Run one measurement in a fresh child process."""
    spec = json.dumps({"variant": variant, "d": d, "k": k, "repeats": repeats,
                       "threads": threads})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} {d}x{k} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_one(shapes: tuple[tuple[int, int], ...], args: argparse.Namespace) -> None:
    """Factored vs dense FlexLoRA, one table row per layer shape."""
    rows = []
    for d, k in shapes:
        fact = measure("factored", d, k, args.repeats, args.threads)
        dense = measure("dense", d, k, args.dense_repeats, args.threads)
        rows.append([f"{d} x {k}", f"{dense['seconds']:.3f}", f"{fact['seconds']:.4f}",
                     f"{dense['seconds'] / fact['seconds']:.0f}x",
                     f"{dense['peak_mib']:.0f}", f"{fact['peak_mib']:.0f}",
                     f"{dense['product_rel_diff']:.1e}", f"{dense['sv_rel_diff']:.1e}"])
        print(f"  measured {d} x {k}", file=sys.stderr, flush=True)
    common.print_table(
        ["layer d x k", "dense s", "factored s", "speed-up", "dense peak MiB",
         "factored peak MiB", "rank-64 product rel. diff", "top-64 sv max rel. diff"], rows,
        title=f"FlexLoRA merge of one layer, 8 clients, ranks {','.join(map(str, MIXED_RANKS))}"
              f" (stacked rank {sum(MIXED_RANKS)}), global rank {GLOBAL_RANK}, float64; time: "
              f"median of {args.repeats} (factored) / {args.dense_repeats} (dense) runs after a "
              f"warm-up; memory: measured growth of the child process's resident set "
              f"(VmHWM at the end - VmRSS once the inputs exist)")


# ---------------------------------------------------------------- part 2: whole model


def model_updates(name: str, layers: int) -> tuple[list[ClientUpdate], Factors, int]:
    """(updates, previous global factors, export rank) for one strategy on the 7B shapes."""
    strategy = METHODS[name]
    ranks = MIXED_RANKS if strategy.heterogeneous else (16,) * len(MIXED_RANKS)
    rank = max(ranks)
    gen = torch.Generator().manual_seed(1)
    previous = {m: (torch.zeros(d, rank), torch.randn(rank, k, generator=gen) / k**0.5)
                for m, (d, k) in LAYER.items()}
    shared = previous if strategy.shares == "B" else None
    updates = replicate(client_updates(LAYER, ranks, a_shared=shared), layers)
    return updates, replicate_factors(previous, layers), rank


def replicate_factors(factors: Factors, layers: int) -> Factors:
    """Per-layer factors under every layer's module names."""
    return {f"model.layers.{i}.{m}": f for i in range(layers) for m, f in factors.items()}


def part_two(layers: int, repeats: int) -> None:
    """One merge call over all modules per strategy; median time."""
    rows = []
    for name in strategies_for():
        updates, previous, rank = model_updates(name, layers)
        get_method(name).merge(updates, previous, export_rank=rank)  # untimed warm-up
        times = []
        for _ in range(repeats):
            with common.stopwatch() as t:
                get_method(name).merge(updates, previous, export_rank=rank)
            times.append(t["seconds"])
        ranks = sorted({u.rank for u in updates})
        rows.append([name, f"{len(updates[0].factors)}", ",".join(map(str, ranks)),
                     f"{common.median(times):.2f}"])
        print(f"  merged {name}", file=sys.stderr, flush=True)
    common.print_table(["strategy", "modules", "client ranks", "merge s / round"], rows,
                       title=f"Whole-model merge, {layers} layers of a 7B-shaped adapter set "
                             f"(LLaMA-7B: q,k,v,o 4096x4096, gate/up/down 4096<->11008), "
                             f"8 clients, median of {repeats} run(s) after a warm-up")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(json.loads(args.child))
        return
    print(f"machine: {common.machine()}")
    if args.quick:
        args.layers = min(args.layers, 2)
    if not args.skip_dense:
        part_one(SHAPES[:1] if args.quick else SHAPES, args)
    part_two(args.layers, args.round_repeats)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} (other work on the machine slows every timing)")


if __name__ == "__main__":
    main()
