"""Server scale: peak memory and seconds of one server round as the number of sites grows.

Each configuration runs in its own child process: a real `server.rounds.RoundLoop` (the
production code: read and validate each reply, screen, merge, exactness, the figures) over a
synthetic grid that makes each site's reply only when the server pulls it, so the replies the
server holds are the server's own doing, not the harness's. Every site replies what it
received plus a perturbation of its own (different per site, so no two updates are equal),
packed as a real client packs it (`fedlora.records.to_array_record`, then Flower's protobuf
round trip, as the SuperLink delivers it).

The baseline is the minimum a server can do: decode each reply as it arrives and add it into
one float64 running sum (no screen, no exactness), in a child process of its own, the same
replies made the same way. Printed side by side: peak RSS (VmHWM), the memory held per reply
beyond the baseline's, and the server's seconds for the round (the time the harness spends
making replies is measured and subtracted).

Shapes: `7b` is Llama-2-7B's (32 layers x q, k, v, o: 4096 x 4096, gate, up: 4096 -> 11008,
down: 11008 -> 4096; 224 modules; 152.5 MiB of float32 factors per site at rank 16); `small`
is 2 layers of the same widths, for a quick look.

    .venv/bin/python benchmarks/server_scale.py                      # 7b, N = 8 32 64
    .venv/bin/python benchmarks/server_scale.py --sites 8 32 64 128 --strategies fedavg
    .venv/bin/python benchmarks/server_scale.py --shape small --sites 4 8   # a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

LAYERS = {"7b": 32, "small": 2}
HIDDEN, MLP = 4096, 11008
RANK = 16
HETERO_RANKS = (8, 16, 32)  # hetlora and flexlora: sites of mixed ranks, global rank 32


def shapes(shape: str) -> dict[str, tuple[int, int]]:
    """module -> (d, k) (out, in) of every adapted layer of the shape."""
    out: dict[str, tuple[int, int]] = {}
    for layer in range(LAYERS[shape]):
        base = f"base_model.model.model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{base}.self_attn.{name}"] = (HIDDEN, HIDDEN)
        out[f"{base}.mlp.gate_proj"] = (MLP, HIDDEN)
        out[f"{base}.mlp.up_proj"] = (MLP, HIDDEN)
        out[f"{base}.mlp.down_proj"] = (HIDDEN, MLP)
    return out


def site_ranks(strategy: str, sites: int) -> list[int]:
    mixed = strategy in ("hetlora", "flexlora")
    return [HETERO_RANKS[i % 3] if mixed else RANK for i in range(sites)]


class Replies:
    """Makes site i's reply to a training message on demand: what it received (PEFT scale,
    wire keys) plus c_i x a fixed noise vector rolled by i, so every site differs."""

    def __init__(self, layer_shapes: dict[str, tuple[int, int]], seed: int = 0) -> None:
        self.noise: dict[int, object] = {}  # rank -> flat noise (one per rank)
        self.seconds = 0.0  # time spent making replies (subtracted from the server's)
        self.seed = seed
        self.shapes = layer_shapes  # a fresh adapter's layers (flora sends no payload)
        self.fresh: dict[int, dict] = {}  # rank -> a fresh adapter's wire state

    def start(self, rank: int) -> dict:
        """What a site of `rank` starts from when the server sends no factors (flora's fresh
        adapters): shared random A, small random B (not zero: the round must move)."""
        if rank not in self.fresh:
            import torch

            from fedlora.adapters.lora import shared_init
            from fedlora.factors import flatten

            factors = shared_init(self.shapes, rank, seed=self.seed + rank)
            gen = torch.Generator().manual_seed(self.seed + rank)
            self.fresh[rank] = flatten({m: (torch.randn(b.shape, generator=gen) * 1e-3, a)
                                        for m, (b, a) in factors.items()})
        return {k: v.clone() for k, v in self.fresh[rank].items()}

    def make(self, message, site: int):
        import torch
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.common.serde import message_from_proto, message_to_proto

        from fedlora import wire
        from fedlora.records import from_array_record, to_array_record

        start = time.perf_counter()
        content = message.content
        rank = int(content[wire.CONFIG][wire.RANK])
        received = from_array_record(content[wire.ARRAYS]) or self.start(rank)
        keys = sorted(received)
        flat = torch.cat([received[k].reshape(-1) for k in keys])
        if rank not in self.noise:
            gen = torch.Generator().manual_seed(self.seed + rank)
            self.noise[rank] = torch.randn(flat.numel(), generator=gen) * 1e-3
        noise = self.noise[rank]
        shift = (site * 7919) % flat.numel()
        flat += torch.roll(noise, shift) * (1.0 + 0.1 * (site % 5))
        state = dict(zip(keys, torch.split(flat, [received[k].numel() for k in keys])))
        state = {k: v.reshape(received[k].shape) for k, v in state.items()}
        reply = Message(RecordDict({
            wire.ARRAYS: to_array_record(state),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 100 + site, wire.LORA_RANK: rank,
                                        wire.PARTITION_ID: site, wire.TRAIN_LOSS: 1.0}),
            wire.CONFIG: ConfigRecord({})}), reply_to=message)
        del state, flat, received
        delivered = message_from_proto(message_to_proto(reply))  # as the SuperLink hands it
        delivered.metadata.__dict__.update(reply.metadata.__dict__)
        self.seconds += time.perf_counter() - start
        return delivered


class SyntheticGrid:
    """Just enough of Flower's Grid for `RoundLoop.train_round`: replies made when pulled."""

    def __init__(self, nodes: list[int], replies: Replies) -> None:
        self.nodes, self.replies = nodes, replies
        self.ids = itertools.count()

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"
            yield self.replies.make(message, message.metadata.dst_node_id)


def run_server(strategy: str, shape: str, sites: int, spill_mb: float = 1024.0,
               clip_norm: float = 0.0) -> dict:
    """One round of the production round loop; this process's figures."""
    import torch

    from fedlora.adapters.lora import shared_init
    from fedlora.config import LoraSettings
    from fedlora.methods import get_method
    from server.defences import Robust
    from server.global_adapter import GlobalAdapter
    from server.record import Node
    from server.rounds import RoundLoop, Rules

    torch.manual_seed(0)
    ranks = site_ranks(strategy, sites)
    global_rank = max(ranks)
    layer_shapes = shapes(shape)
    state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=global_rank),
                          factors=shared_init(layer_shapes, global_rank, seed=0),
                          global_rank=global_rank, robust=Robust("none"), clip_norm=clip_norm)
    # a global adapter that is not zero (B = 0 is the first round only)
    state.factors = {m: (torch.randn(b.shape) * 1e-3, a) for m, (b, a) in state.factors.items()}
    loop = RoundLoop(state, layer_shapes, Rules(timeout=60.0, min_train_nodes=sites,
                                                min_available_nodes=sites,
                                                spill_above_mb=spill_mb), writer=None)
    nodes = list(range(1, sites + 1))
    loop.nodes = {n: Node(n, rank=r) for n, r in zip(nodes, ranks)}
    replies = Replies(layer_shapes)
    grid = SyntheticGrid(nodes, replies)
    # what a ServerApp process has imported before its first round (its grid is Flower's
    # HttpGrid; the round loop asks whether the grid is one): not a cost of the round
    import flwr.superlink.grid.http_grid  # noqa: F401
    before = common.rss_mib()
    start = time.perf_counter()
    record = loop.train_round(grid, 1)
    seconds = time.perf_counter() - start - replies.seconds
    assert len(record.replies) == sites, record.failures
    return {"peak_mib": common.peak_rss_mib(), "start_mib": before, "seconds": seconds,
            "exactness": record.merge.get("exactness"),
            "estimate": record.merge.get("exactness-estimate", "exact"),
            "clipped": record.merge.get("clients-clipped")}


def run_baseline(strategy: str, shape: str, sites: int) -> dict:
    """The minimum: decode each reply as it arrives, add it into one float64 running sum."""
    import torch
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedlora import wire
    from fedlora.adapters.lora import shared_init
    from fedlora.factors import flatten
    from fedlora.records import from_array_record, to_array_record

    ranks = site_ranks(strategy, sites)
    layer_shapes = shapes(shape)
    payloads = {}
    for rank in sorted(set(ranks)):
        init = shared_init(layer_shapes, rank, seed=0)
        init = {m: (torch.randn(b.shape) * 1e-3, a) for m, (b, a) in init.items()}
        payloads[rank] = to_array_record(flatten(init))
    replies = Replies(layer_shapes)
    before = common.rss_mib()
    start = time.perf_counter()
    total: dict[str, torch.Tensor] = {}
    for site, rank in enumerate(ranks, start=1):
        message = Message(RecordDict({wire.ARRAYS: payloads[rank], wire.CONFIG: ConfigRecord(
            {wire.RANK: rank})}), dst_node_id=site, message_type="train")
        message.metadata.__dict__["_message_id"] = f"m{site}"
        reply = replies.make(message, site)
        state = from_array_record(reply.content[wire.ARRAYS])
        del reply
        for key, tensor in state.items():  # zero-padded to the largest rank
            if key not in total:
                shape = [max(ranks) if (key.endswith("lora_A.weight") and i == 0) or
                         (key.endswith("lora_B.weight") and i == 1) else n
                         for i, n in enumerate(tensor.shape)]
                total[key] = torch.zeros(shape, dtype=torch.float64)
            total[key][tuple(slice(0, n) for n in tensor.shape)] += tensor
        del state
    seconds = time.perf_counter() - start - replies.seconds
    return {"peak_mib": common.peak_rss_mib(), "start_mib": before, "seconds": seconds}


def child(args: argparse.Namespace) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    import server  # noqa: F401  (the server's allocator setting, for the baseline too)

    common.quiet_libraries()
    # what Flower tells a ServerApp process before its main runs (messages need a run id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if args.role == "baseline":
        print(json.dumps(run_baseline(args.strategy, args.shape, args.n)))
    else:
        print(json.dumps(run_server(args.strategy, args.shape, args.n, args.spill_above_mb,
                                    args.clip_norm)))


def measure(role: str, strategy: str, shape: str, sites: int, spill_mb: float,
            clip_norm: float = 0.0) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--strategy", strategy, "--shape", shape,
           "--n", str(sites), "--spill-above-mb", str(spill_mb), "--clip-norm", str(clip_norm)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(LAYERS), default="7b")
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--strategies", nargs="+",
                        default=["fedavg", "hetlora", "ffa-lora", "fedsa-lora", "flexlora"])
    parser.add_argument("--spill-above-mb", type=float, default=1024.0,
                        help="the server's spill-above-mb (default 1024, the run config's "
                             "default: a 7B round spills; -1 keeps every reply in memory)")
    parser.add_argument("--clip-norm", type=float, default=0.0,
                        help="the server's clip-norm (default 0: off; the synthetic "
                             "updates' norms are far above 0.01, which clips every reply)")
    parser.add_argument("--child", choices=["server", "baseline"], help=argparse.SUPPRESS,
                        dest="role")
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    print(common.machine())
    per_site = sum((d + k) * RANK for d, k in shapes(args.shape).values()) * 4 / 2**20
    print(f"shape {args.shape}: {len(shapes(args.shape))} modules, {per_site:.1f} MiB of "
          f"float32 factors per site at rank {RANK}")
    rows = []
    for strategy in args.strategies:
        for sites in args.sites:
            base = measure("baseline", strategy, args.shape, sites, args.spill_above_mb)
            ours = measure("server", strategy, args.shape, sites, args.spill_above_mb,
                           args.clip_norm)
            if "error" in ours or "error" in base:
                rows.append([strategy, sites, ours.get("error", ""), base.get("error", ""),
                             "", "", "", "", ""])
                continue
            held = (ours["peak_mib"] - base["peak_mib"]) / sites
            rows.append([strategy, sites, f"{ours['peak_mib'] / 1024:.2f} GB",
                         f"{base['peak_mib'] / 1024:.2f} GB", f"{held:+.0f} MiB",
                         f"{ours['seconds']:.1f} s", f"{base['seconds']:.1f} s",
                         f"{ours['seconds'] / sites:.2f} s",
                         f"{ours['exactness']:.3g} ({ours['estimate']})"
                         if ours["exactness"] is not None else "-"])
            print(json.dumps({"strategy": strategy, "sites": sites, "server": ours,
                              "running-sum": base}), flush=True)
    common.print_table(["strategy", "sites", "server peak RSS", "running sum peak RSS",
                        "held per site beyond it", "server round", "running sum",
                        "server per site", "exactness"], rows)


if __name__ == "__main__":
    main()
