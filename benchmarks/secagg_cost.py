"""Secure aggregation's cost: bytes per client and seconds per round, secure vs plain.

One training round of the real round loop (`server.rounds.RoundLoop.train_round`) over an
in-memory grid (simulations/inprocess.py: every message serialised to protobuf and back, as the
SuperLink does), 10 sites, fedavg, for each adapter shape, once with the plain protocol and
once with secure-aggregation=true, in one run. The sites run fedlora's own client code for
secure aggregation (`clients.secagg`) and the plain reply (`fedlora.records`); their
"training" is a random change of the factors (std 1e-3), so the seconds are the protocol's
and the merge's, not training's. The sites run one after another in this process, so the
seconds are every site's protocol work plus the server's: a bound on the extra wall time of
a round whose sites run in parallel. Each protocol runs --repeats times, alternating, after
one warm-up round; the table shows the median.

A third arm, signed, is the secure protocol with every site signing its keys and the
survivors with its node key and checking its peers' (`fedlora client --auth-key
--secagg-peers`: fedlora.secagg.signing), which adds the consistency stage.

Bytes per client: what one site sends (bytes-up: factors, or keys + sealed shares + masked
vector + unmask shares) and receives (bytes-down: the global adapter, plus the neighbours'
keys, the shares sealed for it and the unmask lists), as the round's metrics count them.

    python benchmarks/secagg_cost.py
    python benchmarks/secagg_cost.py --sites 10 --shapes smollm2-qv smollm2 llama7b-qv
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# (layers, hidden, kv width, intermediate, rank, target modules)
SHAPES = {
    "smollm2-qv": (30, 576, 192, 1536, 8, ("q_proj", "v_proj")),
    "smollm2": (30, 576, 192, 1536, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj")),
    "llama7b-qv": (32, 4096, 4096, 11008, 16, ("q_proj", "v_proj")),
}
LABELS = {"smollm2-qv": "SmolLM2-135M r8 q,v", "smollm2": "SmolLM2-135M r8 all-linear",
          "llama7b-qv": "7B (Llama-2) r16 q,v"}


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of each protocol per shape, alternating; the median is shown")
    return p.parse_args()


def module_shapes(name: str) -> tuple[dict[str, tuple[int, int]], int]:
    """{module: (d_out, k_in)} of every adapted layer, and the rank."""
    layers, hidden, kv, inter, rank, targets = SHAPES[name]
    io = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
          "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
          "down_proj": (hidden, inter)}
    kind = lambda t: "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
        else "mlp"
    return ({f"base_model.model.model.layers.{i}.{kind(t)}.{t}": io[t] for i in range(layers)
             for t in targets}, rank)


def site_app(rank: int):
    """A site's ClientApp: the rank query, a 'training' reply (plain or secure) and the
    secure-aggregation stages, with fedlora's own client code."""
    import torch
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    from clients import secagg
    from fedlora import wire
    from fedlora.records import from_array_record, to_array_record

    def app(msg: Message, context) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            if secagg.settings_of(msg) is not None:
                return secagg.stage(msg, context)
            return Message(RecordDict({wire.METRICS: MetricRecord(
                {wire.LORA_RANK: rank, wire.PARTITION_ID: context.node_id})}), reply_to=msg)
        received = from_array_record(msg.content.array_records[wire.ARRAYS])
        gen = torch.Generator().manual_seed(context.node_id)
        change = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in received.items()}
        metrics = MetricRecord({wire.LORA_RANK: rank, wire.PARTITION_ID: context.node_id,
                                wire.TRAIN_LOSS: 1.0})
        content: dict = {wire.METRICS: metrics}
        secure = secagg.settings_of(msg)
        if secure is None:
            metrics[wire.NUM_EXAMPLES] = 100
            content[wire.ARRAYS] = to_array_record({k: received[k] + change[k]
                                                    for k in received})
        else:
            server_round = int(msg.content.config_records[wire.CONFIG][wire.SERVER_ROUND])
            content[wire.SECAGG], _ = secagg.train_reply(context, secure, server_round,
                                                         change, 100)
        return Message(RecordDict(content), reply_to=msg)
    return app


def one_round(name: str, sites: int, secure: bool, keys: Path | None = None) -> dict:
    """One round of the loop: seconds, and bytes per site up and down (means). With `keys`
    (a folder of site<i> node keys and peers.txt): every site signs its keys with its node
    key and accepts only its peers' (`fedlora client --auth-key --secagg-peers`), so the
    round also signs and checks the survivors (the consistency stage)."""
    from flwr.supercore.task_identity import TaskIdentity

    from clients import secagg
    from fedlora.adapters import shared_init
    from fedlora.config import LoraSettings
    from fedlora.methods import get_method
    from fedlora.outputs import RunWriter
    from server.global_adapter import GlobalAdapter
    from server.rounds import RoundLoop, Rules
    from server.secagg import SecAggRules
    from simulations.inprocess import SERVER_NODE, node_contexts
    from simulations.inprocess import InProcessGrid as FakeGrid

    shapes, rank = module_shapes(name)
    lora = LoraSettings(rank=rank)
    state = GlobalAdapter(method=get_method("fedavg"), lora=lora,
                          factors=shared_init(shapes, rank, 0), global_rank=rank)
    rules = Rules(min_train_nodes=sites, min_available_nodes=sites, fraction_evaluate=0.0,
                  initial_eval=False, secagg=SecAggRules() if secure else None)
    with tempfile.TemporaryDirectory() as out:
        writer = RunWriter(out, None, {})  # type: ignore[arg-type]  # never writes a round
        loop = RoundLoop(state, shapes, rules, writer)
        signed = None if keys is None else (lambda pid: {
            secagg.SIGNING_KEY: str(keys / f"site{pid}"), secagg.PEERS: str(keys / "peers.txt")})
        grid = FakeGrid(site_app(rank), node_contexts({}, sites, signed))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
        loop.learn_ranks(grid, list(grid.contexts), record=_record())
        start = time.perf_counter()
        record = loop.train_round(grid, 1)
        seconds = time.perf_counter() - start
    line = record.line(0)
    assert line["clients-replied"] == sites, line["failures"]
    return {"seconds": seconds, "up": line["bytes-up"] / sites,
            "down": line["bytes-down"] / sites}


def _record():
    from server.record import RoundRecord

    return RoundRecord(0)


def main() -> None:
    args = parse_args()
    common.quiet_libraries()
    print(f"# secure aggregation vs plain, {args.sites} sites, fedavg, one round\n")
    print(common.machine())
    with tempfile.TemporaryDirectory(prefix="secagg-keys-") as folder:
        rows = measure(args, Path(folder))
    common.print_table(["adapter", "up plain", "up secure", "up ratio", "up ratio signed",
                        "down plain", "down secure", "down ratio", "down ratio signed",
                        "s plain", "s secure", "extra s", "s signed"], rows,
                       title=f"bytes per client per round and seconds per round "
                             f"({args.sites} sites, one process; signed: every site signs "
                             f"its keys and the survivors, --auth-key --secagg-peers)")


def measure(args, keys: Path) -> list[list[str]]:
    """The table's rows: each shape's three arms, --repeats rounds each, alternating."""
    from fedlora.cli.certs import make_node_key

    for pid in range(args.sites):
        make_node_key(keys, f"site{pid}")
    (keys / "peers.txt").write_bytes(b"".join((keys / f"site{pid}.pub").read_bytes()
                                              for pid in range(args.sites)))
    one_round(args.shapes[0], 2, secure=True)  # warm-up: imports, first allocations
    arms = {"plain": {"secure": False}, "secure": {"secure": True},
            "signed": {"secure": True, "keys": keys}}
    rows = []
    for name in args.shapes:
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm, options in arms.items():
                runs[arm].append(one_round(name, args.sites, **options))
        plain, secure, signed = ({**r[0], "seconds": common.median(x["seconds"] for x in r)}
                                 for r in runs.values())
        rows.append([LABELS[name], common.fmt_bytes(plain["up"]),
                     common.fmt_bytes(secure["up"]), f"{secure['up'] / plain['up']:.3f}x",
                     f"{signed['up'] / plain['up']:.3f}x",
                     common.fmt_bytes(plain["down"]), common.fmt_bytes(secure["down"]),
                     f"{secure['down'] / plain['down']:.3f}x",
                     f"{signed['down'] / plain['down']:.3f}x", f"{plain['seconds']:.2f}",
                     f"{secure['seconds']:.2f}", f"{secure['seconds'] - plain['seconds']:+.2f}",
                     f"{signed['seconds']:.2f}"])
    return rows


if __name__ == "__main__":
    main()
