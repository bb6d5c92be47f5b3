"""A server whose memory does not grow with the number of sites (`server.spill`, replies read
as they arrive) and whose exactness figure costs linear time in it (the sketch estimate of
`fedlora.aggregation.exactness`)."""

from __future__ import annotations

import gc
import math
import weakref
from types import SimpleNamespace

import pytest
import torch
from fake_grid import run_inprocess
from flwr.app import Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedlora.adapters import flatten, shared_init
from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.exactness import estimated_exactness, exactness, sketch_sides
from fedlora.config import LoraSettings
from fedlora.methods import get_method
from fedlora.outputs import read_metrics, training_rounds
from fedlora.records import to_array_record
from server.global_adapter import GlobalAdapter
from server.record import Node
from server.rounds import RoundLoop, Rules
from server.spill import RoundSpill, SpilledFactors, write_factors


def random_factors(shapes: dict, rank: int, seed: int, scale: float = 0.1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(d, rank, generator=gen) * scale,
                torch.randn(rank, k, generator=gen) * scale) for m, (d, k) in shapes.items()}


SHAPES = {f"base_model.model.layers.{i}.q_proj": (48 + 8 * i, 40) for i in range(4)}


# ---------------------------------------------------------------- spilled replies


def test_spilled_factors_read_back_bitwise_and_say_their_shapes_unread(tmp_path):
    factors = random_factors(SHAPES, 3, seed=1)
    factors["base_model.model.layers.0.q_proj"] = tuple(  # float64 stays float64
        t.double() for t in factors["base_model.model.layers.0.q_proj"])
    spilled = write_factors(factors, tmp_path / "r.safetensors")
    assert list(spilled) == list(factors) and len(spilled) == 4
    assert spilled.shapes() == {m: (tuple(b.shape), tuple(a.shape))
                                for m, (b, a) in factors.items()}
    for module, (b, a) in factors.items():
        got_b, got_a = spilled[module]
        assert got_b.dtype == b.dtype and torch.equal(got_b, b) and torch.equal(got_a, a)
    # a plain safetensors file: other tools read it too
    on_disk = load_file(tmp_path / "r.safetensors")
    assert torch.equal(on_disk["base_model.model.layers.2.q_proj|A"],
                       factors["base_model.model.layers.2.q_proj"][1])
    with pytest.raises(KeyError):
        spilled["no.such.module"]


def test_a_round_spill_folder_is_removed_with_its_replies(tmp_path):
    spill = RoundSpill(tmp_path / ".spill", 3)
    factors = random_factors(SHAPES, 2, seed=0)
    kept = spill.keep(factors)
    module = next(iter(factors))
    assert torch.equal(kept[module][1], factors[module][1])  # a read waits for the write
    assert kept.path.exists() and kept.path.parent.parent == tmp_path / ".spill"
    spill.close()
    assert not kept.path.parent.exists()


def test_spilled_replies_are_written_in_the_background_in_order_and_dropped_on_close(
        tmp_path, monkeypatch):
    """keep() returns before the file is written (a reader waits for it), at most PENDING
    writes wait, and close() drops the writes not started: a reader of one then fails."""
    import threading

    import server.spill as spill_module

    gate = threading.Event()
    real = spill_module.layout

    def slow_layout(factors, path, written=None):
        spilled, write = real(factors, path, written)

        def gated() -> None:
            gate.wait(30)
            write()
        return spilled, gated

    monkeypatch.setattr(spill_module, "layout", slow_layout)
    spill = RoundSpill(tmp_path, 1)
    all_factors = [random_factors(SHAPES, 2, seed=i) for i in range(2)]
    kept = [spill.keep(f) for f in all_factors]
    assert not any(k.path.exists() for k in kept)  # nothing written yet: the writer waits
    gate.set()
    module = next(iter(all_factors[1]))
    assert torch.equal(kept[1][module][0], all_factors[1][module][0])
    assert kept[0].path.exists()  # written in order
    gate.clear()
    more = [spill.keep(random_factors(SHAPES, 2, seed=9)) for _ in range(2)]
    threading.Timer(0.5, gate.set).start()  # the running write finishes; the queued is dropped
    spill.close()
    with pytest.raises(FileNotFoundError):
        more[-1][module]


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora", "hetlora", "ffa-lora", "flora"])
def test_a_merge_of_spilled_replies_equals_the_merge_in_memory_bitwise(tmp_path, strategy):
    ranks = [2, 4, 3] if strategy in ("flexlora", "hetlora", "flora") else [4, 4, 4]
    updates = [ClientUpdate(random_factors(SHAPES, r, seed=i), 10.0 + i)
               for i, r in enumerate(ranks)]
    spill = RoundSpill(tmp_path, 1)
    on_disk = [ClientUpdate(spill.keep(u.factors), u.weight) for u in updates]  # type: ignore
    assert all(isinstance(u.factors, SpilledFactors) for u in on_disk)

    def merged(ups):
        state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=4),
                              factors=shared_init(SHAPES, 4, seed=0), global_rank=4)
        info = state.update(ups)
        return state.export()[0], info

    (memory, info_m), (disk, info_d) = merged(updates), merged(on_disk)
    assert memory.keys() == disk.keys()
    assert all(torch.equal(memory[k], disk[k]) for k in memory)
    assert info_m.get("exactness") == info_d.get("exactness")


def test_clipping_spilled_replies_holds_no_clipped_copy_and_merges_as_in_memory(tmp_path):
    """clip-norm over replies on disk: each clipped reply is clipped module by module as the
    merge reads it (no clipped copy of a whole reply in memory), and the merge is bitwise the
    in-memory one."""
    from fedlora.aggregation.privacy import ClippedFactors
    from fedlora.wire import M
    from server import defences

    updates = [ClientUpdate(random_factors(SHAPES, 4, seed=i, scale=0.5), 10.0 + i)
               for i in range(3)]
    spill = RoundSpill(tmp_path, 1)
    on_disk = [ClientUpdate(spill.keep(u.factors), u.weight) for u in updates]  # type: ignore
    received = [shared_init(SHAPES, 4, seed=0)] * 3
    memory, info_m = defences.clip(updates, received, {}, 0.5, equal=False)
    disk, info_d = defences.clip(on_disk, received, {}, 0.5, equal=False)
    assert info_m[M.CLIENTS_CLIPPED] == info_d[M.CLIENTS_CLIPPED] == 3
    assert all(isinstance(u.factors, ClippedFactors) for u in disk)
    assert all(isinstance(u.factors, dict) for u in memory)
    for m_update, d_update in zip(memory, disk):
        assert d_update.factors.shapes() == {  # type: ignore[attr-defined]
            m: (tuple(b.shape), tuple(a.shape)) for m, (b, a) in m_update.factors.items()}
        for module, (b, a) in m_update.factors.items():
            assert torch.equal(d_update.factors[module][0], b)
            assert torch.equal(d_update.factors[module][1], a)

    def merged(ups):
        state = GlobalAdapter(method=get_method("fedavg"), lora=LoraSettings(rank=4),
                              factors=shared_init(SHAPES, 4, seed=0), global_rank=4,
                              clip_norm=0.5)
        state.update(ups)
        return state.export()[0]

    a, b = merged(updates), merged(on_disk)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replies_are_read_one_at_a_time_never_all_held(tmp_path):
    """The loop reads (and drops) each reply before it pulls the next: when the grid makes
    reply k, no earlier reply message is alive. Collecting them first (as a list) fails."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as Flower does
    loop = _loop("fedavg", nodes=5, spill_above_mb=0, writer_dir=tmp_path)
    made: list[weakref.ref] = []
    alive_when_made: list[int] = []

    def reply(i: int, message: Message) -> Message:
        gc.collect()
        alive_when_made.append(sum(ref() is not None for ref in made))
        made.append(weakref.ref(made_now := _reply_to(message, seed=i)))
        return made_now

    record = loop.train_round(_Grid(reply), 1)
    assert len(record.replies) == 5
    assert alive_when_made == [0, 0, 0, 0, 0]
    assert not (tmp_path / ".spill").exists()  # the round's spilled replies are gone


@pytest.mark.parametrize("outlier", [False, True])
@pytest.mark.parametrize("strategy", ["fedavg", "hetlora", "ffa-lora", "fedsa-lora"])
def test_a_round_folds_replies_as_they_arrive_and_reads_them_again_only_when_screened(
        tmp_path, monkeypatch, outlier, strategy):
    """A merge that is a weighted mean folds the replies into a running sum as they arrive:
    a round that keeps every reply merges from the sum without reading the spill again, and
    gives the bits of the merge over the replies; a round whose screen drops one (a reply
    1,000x the others') reads the kept replies back and merges them alone, again bit for
    bit. (Sketched exactness, as a large round has it: the exact one reads every reply.)"""
    from flwr.supercore.task_identity import TaskIdentity

    import server.global_adapter as global_adapter
    import server.rounds as rounds
    import server.spill as spill_module

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    reads = []
    real_getitem = spill_module.SpilledFactors.__getitem__

    def patch():
        monkeypatch.setattr(spill_module.SpilledFactors, "__getitem__",
                            lambda self, m: reads.append(m) or real_getitem(self, m))
        monkeypatch.setattr(rounds, "EXACT_BUDGET", 0)
        monkeypatch.setattr(global_adapter, "EXACT_BUDGET", 0)

    grid = _Grid(lambda i, message: _reply_to(
        message, seed=i, scale=10.0 if outlier and i == 2 else 0.01, strategy=strategy))

    def merged(fold: bool):
        patch()
        loop = _loop(strategy, nodes=5, spill_above_mb=0, writer_dir=tmp_path / str(fold))
        loop.rules.min_replies = 4
        if not fold:  # the loop folds nothing as replies arrive
            prepare = loop.prepare
            monkeypatch.setattr(loop, "prepare",
                                lambda *a: (prepare(*a), setattr(loop, "fold", None)))
        reads.clear()
        record = loop.train_round(grid, 1)
        monkeypatch.undo()
        if loop.method.exactness_defined:  # fedsa-lora has no global delta W to compare
            assert record.merge["exactness-estimate"] == "sketch-64"
        return loop.state.factors, len(record.replies), len(reads)

    (folded, kept, read), (listed, kept_listed, read_listed) = merged(True), merged(False)
    assert kept == kept_listed == (4 if outlier else 5)
    assert read_listed > 0  # without the fold the merge reads every kept reply back
    assert read == (read_listed if outlier else 0)
    assert all(torch.equal(folded[m][0], listed[m][0]) and
               torch.equal(folded[m][1], listed[m][1]) for m in SHAPES)


@pytest.mark.parametrize("outlier", [False, True])
def test_a_full_disk_keeps_the_rounds_replies_in_memory_and_the_round_merges(
        tmp_path, monkeypatch, outlier):
    """A spill write that fails (ENOSPC from the second reply on) costs memory, not the round:
    every reply stays readable, the round merges the bits of a round that never spilled,
    with a screened outlier too (whose merge reads the replies again), the server warns once,
    and no partial file is left."""
    import errno
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    import server.spill as spill_module

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    real = spill_module.layout
    tried = []

    def full_disk(factors, path, written=None):
        spilled, write = real(factors, path, written)

        def failing() -> None:
            tried.append(path.name)
            if len(tried) > 1:
                path.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            write()
        return spilled, failing

    grid = _Grid(lambda i, message: _reply_to(
        message, seed=i, scale=10.0 if outlier and i == 2 else 0.01))

    def merged(spill_above_mb: float, folder: str):
        loop = _loop("fedavg", nodes=5, spill_above_mb=spill_above_mb,
                     writer_dir=tmp_path / folder)
        loop.rules.min_replies = 4
        record = loop.train_round(grid, 1)
        return loop.state.factors, len(record.replies)

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        monkeypatch.setattr(spill_module, "layout", full_disk)
        spilled, kept = merged(0, "spilled")
        monkeypatch.undo()
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    in_memory, kept_in_memory = merged(-1, "memory")
    assert kept == kept_in_memory == (4 if outlier else 5)
    assert tried == ["reply-1.safetensors", "reply-2.safetensors"]  # none tried after it
    assert all(torch.equal(spilled[m][0], in_memory[m][0]) and
               torch.equal(spilled[m][1], in_memory[m][1]) for m in SHAPES)
    full = [w for w in warnings if "No space left on device" in w]
    assert len(full) == 1 and "keeps its replies in memory" in full[0]
    assert not (tmp_path / "spilled" / ".spill").exists()


def test_a_subclass_that_overrides_combine_alone_never_merges_from_its_parents_sum():
    from fedlora.methods.fedavg import FedAvg

    class Damped(FedAvg):
        def combine(self, updates, previous, *, export_rank):
            return super().combine(updates, previous, export_rank=export_rank)

    assert Damped().folds(4) is None
    assert FedAvg().folds(4) is not None and get_method("hetlora").folds(4) is not None
    assert get_method("flexlora").folds(4) is None  # its merge is no mean of a sum


def test_a_running_sum_is_the_weighted_mean():
    from fedlora.aggregation.base import RunningSum

    updates = [ClientUpdate(random_factors(SHAPES, 4, seed=i), 10.0 + 7 * i,
                            dense={"t": torch.full((3,), float(i))}) for i in range(4)]
    total = RunningSum.of(updates)
    factors, dense = total.mean(torch.float64)
    w = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    p = w / w.sum()
    for m in SHAPES:
        for part in (0, 1):
            oracle = sum(pi * u.factors[m][part].double() for pi, u in zip(p, updates))
            assert torch.allclose(factors[m][part], oracle, rtol=1e-13, atol=1e-15)
    assert torch.allclose(dense["t"], torch.full((3,), float((p * torch.arange(4.0)).sum()),
                                                 dtype=torch.float64))
    assert total.weights == [10.0, 17.0, 24.0, 31.0] and total.weight == 82.0


def test_a_spilled_federation_gives_the_same_adapter_and_metrics(tmp_path):
    """run_inprocess (the real ServerApp and ClientApp on tiny-llama): spilling every round
    (spill-above-mb=0) changes nothing of the result, and leaves no file behind."""
    base = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.01,
            "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
            "num-server-rounds": 2, "min-available-nodes": 3, "min-train-nodes": 3}
    for name, spill in (("memory", -1), ("disk", 0)):
        run_inprocess({**base, "output-dir": str(tmp_path / name), "spill-above-mb": spill}, 3)
    for name in ("memory", "disk"):
        assert not (tmp_path / name / ".spill").exists()
    lines = [training_rounds(read_metrics(tmp_path / n)) for n in ("memory", "disk")]
    for a, b in zip(*lines):
        assert (a["train-loss"], a["exactness"], a["update-norm-median"]) == \
               (b["train-loss"], b["exactness"], b["update-norm-median"])
    memory = load_file(tmp_path / "memory" / "rounds" / "2" / "adapter_model.safetensors")
    disk = load_file(tmp_path / "disk" / "rounds" / "2" / "adapter_model.safetensors")
    assert all(torch.equal(memory[k], disk[k]) for k in memory)


# ---------------------------------------------------------------- the exactness estimate


WIDE = {f"layers.{i}.proj": (512, 384 if i % 2 else 768) for i in range(12)}


@pytest.mark.parametrize("spread", [0.5, 1.0, 2.0])
def test_the_sketch_estimate_is_within_a_few_percent_of_the_exact_figure(spread):
    gen = torch.Generator().manual_seed(int(spread * 10))
    common = random_factors(WIDE, 8, seed=7)
    updates = [ClientUpdate({m: (b + torch.randn(b.shape, generator=gen) * 0.1 * spread,
                                 a + torch.randn(a.shape, generator=gen) * 0.05 * spread)
                             for m, (b, a) in common.items()}, 10.0 + i) for i in range(6)]
    p = [u.weight / sum(v.weight for v in updates) for u in updates]
    fedavg = {m: (sum(w * u.factors[m][0] for w, u in zip(p, updates)),
                  sum(w * u.factors[m][1] for w, u in zip(p, updates))) for m in WIDE}
    exact, per_module = exactness(fedavg, updates)
    estimate, per_estimate = estimated_exactness(
        fedavg, list(WIDE), [sketch_sides(u.factors) for u in updates],
        [u.weight for u in updates])
    assert exact > 0.01  # fedavg is not exact: there is something to estimate
    assert abs(estimate / exact - 1) < 0.05
    assert max(abs(per_estimate[m] / per_module[m] - 1) for m in WIDE) < 0.3
    # an exact merge (the stacked factors) reads as exact, to float32 rounding
    stacked = {m: (torch.cat([w * u.factors[m][0] for w, u in zip(p, updates)], dim=1),
                   torch.cat([u.factors[m][1] for u in updates])) for m in WIDE}
    assert estimated_exactness(stacked, list(WIDE), [sketch_sides(u.factors) for u in updates],
                               [u.weight for u in updates])[0] < 1e-5


def test_a_large_round_estimates_exactness_and_says_so(monkeypatch):
    import server.global_adapter as global_adapter

    updates = [ClientUpdate(random_factors(SHAPES, 4, seed=i), 10.0) for i in range(3)]
    state = GlobalAdapter(method=get_method("fedavg"), lora=LoraSettings(rank=4),
                          factors=shared_init(SHAPES, 4, seed=0), global_rank=4)
    exact = state.update(updates)
    assert exact["exactness-estimate"] == "exact"
    monkeypatch.setattr(global_adapter, "EXACT_BUDGET", 0)
    state = GlobalAdapter(method=get_method("fedavg"), lora=LoraSettings(rank=4),
                          factors=shared_init(SHAPES, 4, seed=0), global_rank=4)
    estimated = state.update(updates)
    assert estimated["exactness-estimate"] == "sketch-64"
    assert estimated["exactness"] != exact["exactness"]
    assert abs(estimated["exactness"] / exact["exactness"] - 1) < 0.25


# ---------------------------------------------------------------- helpers


def _loop(strategy: str, nodes: int, spill_above_mb: float, writer_dir=None) -> RoundLoop:
    state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=4),
                          factors=shared_init(SHAPES, 4, seed=0), global_rank=4)
    writer = SimpleNamespace(out_dir=str(writer_dir)) if writer_dir is not None else None
    loop = RoundLoop(state, SHAPES, Rules(timeout=10.0, min_train_nodes=nodes,
                                          min_available_nodes=nodes,
                                          spill_above_mb=spill_above_mb), writer=writer)
    loop.nodes = {n: Node(n, rank=4) for n in range(1, nodes + 1)}
    return loop


class _Grid:
    """Five nodes; `reply(i, message)` makes the i-th reply when the loop pulls it (the
    grid holds none of them)."""

    def __init__(self, reply) -> None:
        self.reply = reply

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]

    def send_and_receive(self, messages, *, timeout=None):
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{i}"
            yield self.reply(i, message)


def _reply_to(message: Message, seed: int, scale: float = 0.01, strategy: str = "fedavg"
              ) -> Message:
    state = get_method(strategy).shared(flatten(random_factors(SHAPES, 4, seed=seed,
                                                               scale=scale)))
    metrics = MetricRecord({"num-examples": 10, "lora-rank": 4, "partition-id": seed})
    reply = Message(RecordDict({"arrays": to_array_record(state),
                                "metrics": metrics}), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
    return reply


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_a_round_spills_by_the_replies_it_expects_even_when_it_sends_nothing(
        tmp_path, strategy, monkeypatch):
    """The spill decision counts each reply at what was sent to its node or, where nothing
    was (flora's fresh adapters: an empty payload), at a float32 adapter of the node's rank:
    flora's 32-site round of the 7B shape held every reply in memory (9.9 GB) before."""
    from flwr.supercore.task_identity import TaskIdentity

    import server.rounds as rounds

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    opened: list = []

    class Watched(rounds.RoundSpill):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(rounds, "RoundSpill", Watched)
    per_reply = 4 * 4 * sum(d + k for d, k in SHAPES.values())  # rank 4, float32
    loop = _loop(strategy, nodes=5, spill_above_mb=4.5 * per_reply / 2**20,
                 writer_dir=tmp_path)
    record = loop.train_round(_Grid(lambda i, m: _reply_to(m, seed=i, strategy=strategy)), 1)
    assert len(record.replies) == 5 and len(opened) == 1
    assert (sum(record.bytes_down.values()) == 0) == (strategy == "flora")


def test_spill_above_mb_is_a_setting_with_a_clear_error():
    from fedlora.config import Settings, SettingsError, all_keys

    default, help_text = all_keys()["spill-above-mb"]
    assert default == 1024.0 and "memory" in help_text
    with pytest.raises(SettingsError, match="spill-above-mb"):
        Settings.from_config({"spill-above-mb": -5})


# ---------------------------------------------------------------- flexlora at many clients


def test_flexlora_of_a_large_round_keeps_the_exact_svd_to_float32_rounding(monkeypatch):
    """Above EXACT_BUDGET flexlora's SVD is randomised (linear in the clients): on clients
    sharing a subspace plus their own noise, its rank-8 global adapter is within 1e-4 of the
    exact one's product (relative)."""
    import fedlora.methods.flexlora as flexlora

    gen = torch.Generator().manual_seed(3)
    shared = random_factors(WIDE, 8, seed=11)
    updates = [ClientUpdate({m: (b[:, :r] + torch.randn(b[:, :r].shape, generator=gen) * 0.03,
                                 a[:r] + torch.randn(a[:r].shape, generator=gen) * 0.03)
                             for m, (b, a) in shared.items()}, 10.0 + i)
               for i, r in enumerate([4, 8, 6, 8, 4, 8, 6, 8])]
    method = get_method("flexlora")
    exact = method.combine(updates, {}, export_rank=8)
    monkeypatch.setattr(flexlora, "EXACT_BUDGET", 0)
    fast = method.combine(updates, {}, export_rank=8)
    assert (exact.info["svd"], fast.info["svd"]) == ("exact", "randomized-18")
    for module in WIDE:
        want = exact.global_factors[module][0] @ exact.global_factors[module][1]
        got = fast.global_factors[module][0] @ fast.global_factors[module][1]
        assert float((got - want).norm() / want.norm()) < 1e-4
    # what the truncation drops: from the 10 next components only, a lower bound
    assert 0 < fast.info["dropped"] <= exact.info["dropped"] * (1 + 1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsa-lora", "flora", "hetlora"])
def test_a_replys_figures_in_one_pass_equal_the_screens_own(strategy):
    """`figures` gives the screens' `moved` and `distance` to 1e-5 (in float64 where float32
    overflows or the dtypes differ) and, where the merge weighs by them (hetlora), each
    module's ||B A||_F to 1e-6 of the float64 figure; None for the other strategies."""
    state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=4),
                          factors=random_factors(SHAPES, 4, seed=5), global_rank=4)
    update = ClientUpdate(random_factors(SHAPES, 4, seed=6), 10.0)

    def check(update: ClientUpdate, rel: float) -> None:
        moved, distance, norms = state.figures(update)
        assert math.isfinite(moved) and math.isfinite(distance)
        assert (moved, distance) == pytest.approx((state.moved(update), state.distance(update)),
                                                  rel=rel)
        if strategy == "flora":  # fresh adapters: measured from zero factors (B A itself)
            factors = [(b.double(), a.double()) for b, a in update.factors.values()]
            assert moved == pytest.approx(math.sqrt(sum(
                float((b @ a).square().sum()) for b, a in factors)), rel=rel)
            assert distance == pytest.approx(math.sqrt(sum(
                float(b.square().sum() + a.square().sum()) for b, a in factors)), rel=rel)
        if strategy != "hetlora":
            assert norms is None
            return
        assert norms is not None and set(norms) == set(update.factors)
        for module, (b, a) in update.factors.items():
            want = float((b.double() @ a.double()).norm())
            assert math.isfinite(norms[module]) and norms[module] == pytest.approx(want, rel=1e-6)

    check(update, 1e-5)
    # a change beyond float32's range (B - B_ref and the Gram blocks overflow) is measured in
    # float64, as the screens' own figures measure it
    huge = {m: (b.sign() * 3e38, a * 1e19) for m, (b, a) in update.factors.items()}
    check(ClientUpdate(huge, 10.0), 1e-5)
    wide = ClientUpdate({m: (b.double(), a.double()) for m, (b, a) in update.factors.items()},
                        10.0)  # float64 factors against float32 received ones
    check(wide, 1e-5)


@pytest.mark.slow
def test_the_documented_server_scale_commands_run_at_a_small_size(tmp_path):
    """Each `benchmarks/server_scale.py` command of docs/benchmarks.md, run as written but on
    the 2-layer shape at 2 sites: it exits 0 and prints a row per strategy, with figures from
    the server and the running sum (in memory where the command says -1)."""
    import json
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from test_scaling import documented

    root = Path(__file__).resolve().parent.parent
    lines = documented(root / "docs" / "benchmarks.md", "benchmarks/server_scale.py")
    assert len(lines) >= 3
    commands: dict[tuple[str, ...], None] = {}  # each command once, at 2 sites
    for line in lines:
        words = shlex.split(line)[2:]
        if "--sites" in words:  # the sites list: 2 instead
            i = words.index("--sites") + 1
            while i < len(words) and not words[i].startswith("--"):
                del words[i]
            words.insert(i, "2")
        commands[tuple(words)] = None
    for command in commands:
        words = list(command)
        done = subprocess.run([sys.executable, str(root / "benchmarks" / "server_scale.py"),
                               *words, "--shape", "small"], capture_output=True, text=True,
                              cwd=root, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(out) for out in done.stdout.splitlines() if out.startswith("{")]
        strategies = words[words.index("--strategies") + 1:]
        strategies = strategies[:next((i for i, w in enumerate(strategies)
                                       if w.startswith("--")), len(strategies))]
        assert [r["strategy"] for r in rows] == strategies
        assert all(r["server"]["seconds"] > 0 and r["running-sum"]["seconds"] > 0 for r in rows)


# ---------------------------------------------------------------- residual methods at scale


def similar_updates(shapes: dict, rank: int, sites: int, noise: float, seed: int) -> list:
    """`sites` updates sharing one adapter plus noise of their own (a round's replies)."""
    gen = torch.Generator().manual_seed(seed)
    shared = random_factors(shapes, rank, seed=seed + 1)
    return [ClientUpdate({m: (b + torch.randn(b.shape, generator=gen) * noise,
                              a + torch.randn(a.shape, generator=gen) * noise)
                          for m, (b, a) in shared.items()}, 10.0 + i) for i in range(sites)]


@pytest.mark.parametrize("strategy", ["flora", "fedex-lora"])
def test_a_residual_merge_holds_one_modules_stack_at_a_time(strategy, monkeypatch):
    """flora's and fedex-lora's stacks (rank sum_i r_i: 11 GB at 32 sites of a 7B shape) are
    made module by module while the server figures and compresses the round: at no point are
    more than two modules' stacks alive (all twelve were, before)."""
    import fedlora.methods.fedex_lora as fedex
    import fedlora.methods.flora as flora

    module = flora if strategy == "flora" else fedex
    made: list[weakref.ref] = []
    most = 0

    def counting(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal most
        most = max(most, sum(r() is not None for r in made))
        out = (b.float(), a.float())
        made.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(module, "to32", counting)
    updates = similar_updates(WIDE, 4, sites=6, noise=0.05, seed=2)
    state = GlobalAdapter(method=get_method(strategy, residual_rank=4), lora=LoraSettings(rank=4),
                          factors=random_factors(WIDE, 4, seed=9), global_rank=4)
    info = state.update(updates)
    assert len(made) >= len(WIDE) and 1 <= most <= 2
    assert info["residual-rank"] == 4 and 0 < info["residual-dropped"] < 1
    assert all(b.shape[1] == 4 for b, _ in state.residual.values())


def test_a_large_residual_is_compressed_by_the_randomised_svd_near_the_exact_cut(monkeypatch):
    """A layer whose stacked residual would cost more than RANDOMIZED_LAYER in the factored
    SVD is cut by the randomised one: on a fedex-lora residual of 30 similar sites (a flat
    spectrum, the randomised SVD's hard case: the exact rank-8 cut drops 84 % of its norm),
    its cut leaves at most 3 % more error than the exact (Eckart-Young) cut (measured 1.2-1.5
    %), and the norm it reports dropped is a lower bound of the exact one."""
    import fedlora.aggregation.exactness as ex

    shapes = {f"layers.{i}.proj": (256, 192) for i in range(3)}
    updates = similar_updates(shapes, 4, sites=30, noise=0.05, seed=4)
    residual = get_method("fedex-lora").combine(updates, {}, export_rank=4).residual
    stacks = {m: residual[m] for m in shapes}  # rank 124 each
    exact, exact_dropped = ex.compress(stacks, 8)
    monkeypatch.setattr(ex, "RANDOMIZED_LAYER", 0)
    assert ex.randomized_compress(256, 192, 124, 8)
    assert not ex.randomized_compress(256, 192, 35, 8)  # under twice its 18 components
    fast, fast_dropped = ex.compress(stacks, 8)
    for module, (b, a) in stacks.items():
        whole = (b.double() @ a.double())
        cut_exact = (whole - exact[module][0].double() @ exact[module][1].double()).norm()
        cut_fast = (whole - fast[module][0].double() @ fast[module][1].double()).norm()
        assert fast[module][0].shape == (256, 8) and fast[module][0].dtype == torch.float32
        assert cut_exact <= cut_fast <= 1.03 * cut_exact
    assert 0 < fast_dropped <= exact_dropped * (1 + 1e-6)


@pytest.mark.parametrize("strategy", ["flora", "fedex-lora"])
def test_a_residual_methods_stack_is_made_once_for_both_the_estimate_and_the_cut(
        strategy, monkeypatch):
    """In a round whose exactness is estimated (a large one), each module's stack of the
    replies is made once: the residual's compression makes it, and the estimate sketches it
    then (twice before: once more for the estimate, 9.6 of fedex-lora's 45.8 s at 32 sites of
    the 7B shape). The figures are the ones the estimate gives from the applied update."""
    import fedlora.methods.fedex_lora as fedex
    import fedlora.methods.flora as flora
    import server.global_adapter as global_adapter

    monkeypatch.setattr(global_adapter, "EXACT_BUDGET", 0)  # estimate at any size
    module = flora if strategy == "flora" else fedex
    made: dict[str, int] = {}
    pairs = module.raw_pairs

    def counting(updates, name):
        made[name] = made.get(name, 0) + 1
        return pairs(updates, name)

    monkeypatch.setattr(module, "raw_pairs", counting)
    updates = similar_updates(WIDE, 4, sites=6, noise=0.05, seed=3)

    def round_info(reuse: bool) -> dict:
        made.clear()
        state = GlobalAdapter(method=get_method(strategy, residual_rank=8),
                              lora=LoraSettings(rank=4), factors=random_factors(WIDE, 4, seed=5),
                              global_rank=4)
        if not reuse:
            monkeypatch.setattr(state, "reuses_stack", lambda *_: False)
        return state.update(updates)

    before = round_info(reuse=False)
    assert made == dict.fromkeys(WIDE, 2)  # the old way: made for the estimate and the cut
    info = round_info(reuse=True)
    assert made == dict.fromkeys(WIDE, 1)
    assert info["exactness-estimate"] == "sketch-64"
    assert 0 <= info["exactness"] < 1e-5  # exact methods, to float32 rounding
    assert info["exactness"] == pytest.approx(before["exactness"], rel=1e-6)
    assert info["exactness-per-module"] == pytest.approx(before["exactness-per-module"],
                                                         rel=1e-6)
    assert info["residual-dropped"] == before["residual-dropped"]
