"""SecAgg+ as pure functions (fedlora.secagg): the unmasked sum against the plain sum, with
sites dropping; masked vectors that say nothing of the update; forged, replayed and
redirected shares refused; every unsupported combination of settings refused with its
reason. The round loop's use of it: tests/test_secagg_rounds.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedlora.config import SettingsError
from fedlora.methods import load
from fedlora.secagg import protocol as p
from fedlora.secagg.vector import Layout, Quantizer, bits_for

ROUND = 7


class Sites:
    """n sites of one round, driven through every stage as the nodes and the server do."""

    def __init__(self, n: int, size: int, degree: int = 0, dropout: int = 1) -> None:
        self.nodes = [101 + 3 * i for i in range(n)]
        self.size, self.dropout = size, dropout
        self.c = {v: p.private_bytes(p.new_key()) for v in self.nodes}
        self.s = {v: p.private_bytes(p.new_key()) for v in self.nodes}
        self.cp = {v: p.public_bytes(p.load_private(k)) for v, k in self.c.items()}
        self.sp = {v: p.public_bytes(p.load_private(k)) for v, k in self.s.items()}
        self.seed = {v: os.urandom(32) for v in self.nodes}
        self.graph = p.neighbours(self.nodes, degree)

    def t(self, node: int) -> int:
        return p.threshold(len(self.graph[node]) + 1, self.dropout)

    def share(self, shared: list[int]) -> dict[int, dict[int, p.Share]]:
        """Stage share-keys (by `shared`) and collect-masked's opening: holder -> src -> share."""
        held: dict[int, dict[int, p.Share]] = {}
        for v in shared:
            shares = p.split_secrets(ROUND, v, [*self.graph[v], v], self.seed[v], self.s[v],
                                     self.t(v))
            for holder, share in shares.items():
                sealed = p.seal(share, self.c[v], self.cp[holder])
                held.setdefault(holder, {})[v] = p.open_share(sealed, self.c[holder],
                                                              self.cp[v], ROUND, v, holder)
        return held

    def mask(self, node: int, x: np.ndarray, shared: list[int]) -> np.ndarray:
        return p.masked(x, node, self.seed[node], self.s[node],
                        {j: self.sp[j] for j in self.graph[node] if j in shared})

    def unmask(self, total: np.ndarray, held: dict, shared: list[int], masked: list[int],
               answered: list[int]) -> np.ndarray:
        seeds = {v: p.rebuild([held[h][v].seed for h in answered if v in held.get(h, {})],
                              self.t(v)) for v in masked}
        gone = [v for v in shared if v not in masked]
        keys = {v: p.rebuild([held[h][v].key for h in answered if v in held.get(h, {})],
                             self.t(v)) for v in gone}
        return p.unmask(total, seeds, keys, self.sp,
                        {v: [j for j in self.graph[v] if j in shared] for v in gone})


def run(sites: Sites, xs: dict[int, np.ndarray], shared: list[int], masked: list[int],
        answered: list[int]) -> np.ndarray:
    held = sites.share(shared)
    total = np.zeros(sites.size, dtype=np.uint32)
    for v in masked:
        total += sites.mask(v, xs[v], shared)
    return sites.unmask(total, held, shared, masked, answered)


def integers(sites: Sites, rng: np.random.Generator) -> dict[int, np.ndarray]:
    q = 2 ** (bits_for(len(sites.nodes)) - 1) - 1
    return {v: rng.integers(-q, q + 1, sites.size).astype(np.uint32) for v in sites.nodes}


@pytest.mark.parametrize("n,degree,dropout,gone_early,gone_late", [
    (4, 0, 1, 0, 0),  # SecAgg: everyone is everyone's neighbour
    (5, 0, 1, 1, 0),  # one site drops after sharing its keys, before its masked vector
    (5, 0, 2, 2, 0),  # t = secagg-dropout sites drop there
    (5, 0, 1, 0, 1),  # one site drops after its masked vector arrived: recovered
    (7, 4, 2, 1, 1),  # SecAgg+: a ring of degree 4, two neighbours drop, one at each point
])
def test_unmasked_sum_is_the_plain_sum_of_the_survivors(n, degree, dropout, gone_early,
                                                         gone_late):
    rng = np.random.default_rng(n + degree)
    sites = Sites(n, 1000, degree, dropout)
    xs = integers(sites, rng)
    masked = sites.nodes[gone_early:]  # the first gone_early shared, then dropped
    answered = masked[gone_late:]  # the next gone_late sent their vector, then dropped
    got = run(sites, xs, sites.nodes, masked, answered)
    want = np.zeros(sites.size, dtype=np.uint32)
    for v in masked:
        want += xs[v]
    np.testing.assert_array_equal(got, want)


def test_more_drops_than_the_threshold_cannot_rebuild_a_seed():
    sites = Sites(5, 10, dropout=1)  # t = 4 of 5
    held = sites.share(sites.nodes)
    v = sites.nodes[0]
    with pytest.raises(ValueError, match="3 shares, 4 needed"):
        p.rebuild([held[h][v].seed for h in sites.nodes[2:]], sites.t(v))


def test_the_threshold_is_always_more_than_half():
    assert p.threshold(5, 1) == 4 and p.threshold(5, 2) == 3
    assert p.threshold(5, 4) == 3  # asking for more tolerance does not go below a majority
    assert p.threshold(2, 1) == 2


def test_neighbours_of_a_ring_are_symmetric_and_of_the_degree():
    graph = p.neighbours(list(range(10)), 4)
    assert all(len(v) == 4 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    assert p.neighbours([1, 2, 3], 4) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}


def uniform_p_value(values: np.ndarray, bins: int = 16) -> float:
    """Chi-square test that uint32 values are uniform (over their top 4 bits)."""
    from scipy.stats import chisquare

    counts = np.bincount((values >> 28).astype(np.int64), minlength=bins)
    return float(chisquare(counts).pvalue)


def test_a_masked_vector_is_independent_of_the_update():
    """Two very different updates (all zeros, all at the top of the range) give masked
    vectors that both look uniform, and so does their difference: with the mask missing
    (y = x) or reused (the same seeds for both, so y1 - y2 = x1 - x2) the test fails."""
    sites = Sites(3, 20_000)
    v, shared = sites.nodes[0], sites.nodes
    zeros = np.zeros(sites.size, dtype=np.uint32)
    high = np.full(sites.size, 2 ** 29, dtype=np.uint32)
    y1 = sites.mask(v, zeros, shared)
    fresh = Sites(3, 20_000)  # the next round: fresh keys and seeds
    y2 = fresh.mask(fresh.nodes[0], high, fresh.nodes)
    for values in (y1, y2, y2 - y1):
        assert uniform_p_value(values) > 1e-4
    reused = sites.mask(v, high, shared)  # the same mask again: the difference is the data
    assert uniform_p_value(reused - y1) < 1e-12
    assert uniform_p_value(high) < 1e-12  # no mask: the update itself


def test_a_forged_replayed_or_redirected_share_is_refused():
    sites = Sites(3, 10)
    a, b, c = sites.nodes
    share = p.split_secrets(ROUND, a, [a, b, c], sites.seed[a], sites.s[a], 2)[b]
    sealed = p.seal(share, sites.c[a], sites.cp[b])
    forged = sealed[:-8] + bytes(8)
    with pytest.raises(p.ShareRefused, match="does not open"):
        p.open_share(forged, sites.c[b], sites.cp[a], ROUND, a, b)
    with pytest.raises(p.ShareRefused, match="does not open"):  # c sealed it, claims to be a
        p.open_share(p.seal(share, sites.c[c], sites.cp[b]), sites.c[b], sites.cp[a], ROUND,
                     a, b)
    with pytest.raises(p.ShareRefused, match="replayed or redirected"):  # a later round
        p.open_share(sealed, sites.c[b], sites.cp[a], ROUND + 1, a, b)
    to_c = p.seal(share, sites.c[a], sites.cp[c])  # b's share, sealed for c
    with pytest.raises(p.ShareRefused, match="replayed or redirected"):
        p.open_share(to_c, sites.c[c], sites.cp[a], ROUND, a, c)
    assert p.open_share(sealed, sites.c[b], sites.cp[a], ROUND, a, b) == share


def test_weight_groups_give_each_group_the_mean_over_the_sites_in_it():
    """lora-moe's experts: site 0 trains expert-0, site 1 expert-1, both the shared group; each
    group's sum over its own weights is that group's weighted mean, and a site's vector puts
    nothing (tensor nor weight) in a group it did not train."""
    group = lambda key: key.split("/")[0]
    layout = Layout.of({"expert-0/w": (2,), "expert-1/w": (2,), "shared/r": (3,)}, group)
    assert layout.groups == ("expert-0", "expert-1", "shared") and layout.size == 10
    q = Quantizer(1.0, bits_for(2), len(layout.groups))
    rng = np.random.default_rng(0)
    sites = [({"expert-0/w": np.array([0.2, -0.1]), "expert-1/w": np.array([0.5, 0.5]),
               "shared/r": np.array([0.1, 0.2, 0.3])}, 0.25, {"expert-0", "shared"}),
             ({"expert-0/w": np.array([0.9, 0.9]), "expert-1/w": np.array([-0.4, 0.3]),
               "shared/r": np.array([-0.3, 0.0, 0.1])}, 0.75, {"expert-1", "shared"})]
    total = np.zeros(layout.size, dtype=np.uint32)
    for values, w, trained in sites:
        vector = layout.flatten(values, w, trained)
        untrained = "expert-1" if "expert-0" in trained else "expert-0"
        assert vector[layout.groups.index(untrained) - 3] == 0.0  # its weight entry
        total += q.quantize(vector, rng)[0]
    got, weights = layout.split(q.dequantize(total))
    step = 2 / q.levels
    assert weights == pytest.approx({"expert-0": 0.25, "expert-1": 0.75, "shared": 1.0},
                                    abs=step)
    np.testing.assert_allclose(got["expert-0/w"] / weights["expert-0"], [0.2, -0.1], atol=1e-6)
    np.testing.assert_allclose(got["expert-1/w"] / weights["expert-1"], [-0.4, 0.3], atol=1e-6)
    np.testing.assert_allclose(got["shared/r"], [0.25 * 0.1 - 0.75 * 0.3, 0.25 * 0.2,
                                                 0.25 * 0.3 + 0.75 * 0.1], atol=1e-6)


def test_quantised_sum_is_the_plain_sum_within_the_stated_error():
    rng = np.random.default_rng(0)
    n, clip = 10, 0.5
    layout = Layout.of({"a": (30, 8), "b": (8, 12)})
    q = Quantizer(clip, bits_for(n))
    assert q.bits == 28
    updates = [{"a": rng.normal(0, 0.1, (30, 8)), "b": rng.normal(0, 0.1, (8, 12))}
               for _ in range(n)]
    weights = rng.uniform(0.1, 1, n)
    total = np.zeros(layout.size, dtype=np.uint32)
    for update, w in zip(updates, weights):
        x, clipped = q.quantize(layout.flatten(update, w), rng)
        assert clipped == 0
        total += x
    got, summed = layout.split(q.dequantize(total))
    bound = n * clip / q.levels  # per entry
    assert abs(summed["all"] - weights.sum()) <= n / q.levels
    for key in got:
        plain = sum(w * u[key] for u, w in zip(updates, weights))
        assert np.abs(got[key] - plain).max() <= bound


def test_values_outside_the_range_are_clipped_and_counted():
    q = Quantizer(1.0, 20)
    x, clipped = q.quantize(np.array([5.0, -0.5, -9.0, 1.0]), np.random.default_rng(0))
    assert clipped == 2
    np.testing.assert_allclose(q.dequantize(x)[:3], [1.0, -0.5, -1.0], atol=1e-5)


SECURE = {"secure-aggregation": True, "model": "tiny-llama"}


@pytest.mark.parametrize("extra,key,reason", [
    ({"strategy": "flexlora"}, "strategy", "SVD"),
    ({"strategy": "flora"}, "strategy", "stacks each client's factors"),
    ({"strategy": "fedex-lora"}, "strategy", "residual"),
    ({"strategy": "hetlora"}, "hetlora-weighting", "norm weights are each client's own"),
    ({"strategy": "hetlora", "hetlora-weighting": "examples", "hetlora-prune": 0.5},
     "hetlora-prune", "tells the server the rank"),
    ({"strategy": "lora-moe", "peft": "lora-moe", "moe-assign": "cluster"}, "moe-assign",
     "by their own updates"),
    ({"strategy": "lora-moe", "peft": "lora-moe", "moe-assign": "client", "clip-norm": 1.0,
      "dp-clipping": "client", "dp-noise-multiplier": 1.0}, "dp-noise-multiplier",
     "each expert's trainers"),
    ({"robust": "median", "min-replies": 3}, "robust", "sees only their sum"),
    ({"robust": "krum", "min-replies": 4}, "robust", "sees only their sum"),
    ({"robust": "trimmed-mean", "min-replies": 3}, "robust", "sees only their sum"),
    ({"max-update-norm": 5.0}, "max-update-norm", "cannot measure one update"),
    ({"max-update-ratio": 3.0}, "max-update-ratio", "cannot compare one update"),
    ({"max-weight-ratio": 3.0}, "max-weight-ratio", "never sees a site's num-examples"),
    ({"max-share": 0.3}, "max-share", "never sees one site's weight"),
    ({"clip-norm": 1.0}, "dp-clipping", "never sees one update to clip"),
    ({"clip-norm": 1.0, "dp-noise-multiplier": 1.0}, "dp-clipping", "set dp-clipping=client"),
    ({"strategy": "ffa-lora", "client-ranks": "4,8"}, "client-ranks", "pad their factors "
                                                                     "to the global rank"),
])
def test_every_unsupported_combination_is_refused_with_its_reason(extra, key, reason):
    with pytest.raises(SettingsError, match=f"setting '{key}': secure-aggregation=true") as err:
        load({**SECURE, **extra})
    assert reason in str(err.value)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "ffa-lora", "fedsa-lora",
                                      "hetlora"])
def test_supported_strategies_load_with_the_default_screens(strategy):
    extra = {"hetlora-weighting": "examples", "client-ranks": "4,8"} if strategy == "hetlora" \
        else {}
    settings, method = load({**SECURE, "strategy": strategy, **extra})
    assert settings.federation.secure_aggregation and method.secagg_refusal == ""


@pytest.mark.parametrize("key,value", [("secagg-dropout", -1), ("secagg-neighbours", 3),
                                       ("secagg-clip", 0.0), ("secagg-max-weight", 0)])
def test_bad_secagg_settings_are_refused(key, value):
    with pytest.raises(SettingsError, match=f"setting '{key}'"):
        load({**SECURE, key: value})


def test_fedlora_client_require_flag_sets_the_node_config_key():
    import argparse

    from fedlora.cli.client import add_arguments, node_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--server", "127.0.0.1:9092", "--insecure", "--name", "site-a"]
    assert node_config(parser.parse_args(base + ["--require-secure-aggregation"]))[
        "require-secure-aggregation"] is True
    assert "require-secure-aggregation" not in node_config(parser.parse_args(base))


def test_each_site_adds_its_share_of_the_noise_in_delta_w_scale():
    """z C / sqrt(m - d) per site; on B divided by the LoRA scale (delta W = scale B A)."""
    import torch

    from fedlora.secagg.noise import noised_change, site_noise_std

    assert site_noise_std(2.0, 0.5, 5, 1) == pytest.approx(0.5)
    zero = {"m.lora_A.weight": torch.zeros(200, 200), "m.lora_B.weight": torch.zeros(200, 200),
            "m.ia3_l.weight": torch.zeros(200, 200)}
    noised = noised_change(zero, 0.1, 4.0, torch.Generator().manual_seed(0))
    assert noised["m.lora_A.weight"].std().item() == pytest.approx(0.1, rel=0.02)
    assert noised["m.lora_B.weight"].std().item() == pytest.approx(0.025, rel=0.02)
    assert noised["m.ia3_l.weight"].std().item() == pytest.approx(0.1, rel=0.02)


def test_a_node_refuses_stages_out_of_order_stale_or_asked_twice():
    """clients.secagg on its own: a node answers share-keys, collect-masked and unmask once
    each, in that order, for the round it trained; an unmask naming a node both survived and
    dropped is refused (the server would get both of its secrets)."""
    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients import secagg
    from fedlora import wire

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    nodes = (11, 12)
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
           for n in nodes}
    train = ConfigRecord({wire.SECAGG_SITES: 2, wire.SECAGG_CLIP: 1.0,
                          wire.SECAGG_MAX_WEIGHT: 10, wire.SECAGG_EQUAL: True})
    keys = {n: secagg.train_reply(ctx[n], train, 3, {"w": torch.full((4,), 0.25)}, 5)[0]
            for n in nodes}

    def ask(node: int, stage: str, server_round: int = 3, **values) -> Message:
        config = ConfigRecord({wire.SECAGG_STAGE: stage, wire.SERVER_ROUND: server_round,
                               **values})
        msg = Message(RecordDict({wire.SECAGG: config}), dst_node_id=node,
                      message_type=MessageType.QUERY)
        return secagg.stage(msg, ctx[node])

    with pytest.raises(secagg.ProtocolRefused, match="must follow 'share-keys'"):
        ask(11, "collect-masked", **{wire.SECAGG_NODES: [], wire.SECAGG_SEALED: []})
    with pytest.raises(secagg.ProtocolRefused, match="trained no round of it"):
        ask(11, "share-keys", server_round=4)
    sealed = {}
    for n, other in ((11, 12), (12, 11)):
        reply = ask(n, "share-keys", **{
            wire.SECAGG_NODES: [other], wire.SECAGG_THRESHOLD: 2,
            wire.SECAGG_C_KEY: [keys[other][wire.SECAGG_C_KEY]],
            wire.SECAGG_S_KEY: [keys[other][wire.SECAGG_S_KEY]]})
        sealed[n] = reply.content.config_records[wire.SECAGG][wire.SECAGG_SEALED][0]
    for n, other in ((11, 12), (12, 11)):
        ask(n, "collect-masked", **{wire.SECAGG_NODES: [other],
                                    wire.SECAGG_SEALED: [sealed[other]]})
    with pytest.raises(secagg.ProtocolRefused, match="both as survived and as dropped"):
        ask(11, "unmask", **{wire.SECAGG_SURVIVORS: [11, 12], wire.SECAGG_DROPPED: [12]})
    answer = ask(11, "unmask", **{wire.SECAGG_SURVIVORS: [11, 12], wire.SECAGG_DROPPED: []})
    assert answer.content.config_records[wire.SECAGG][wire.SECAGG_SURVIVORS] == [11, 12]
    with pytest.raises(secagg.ProtocolRefused, match="trained no round of it"):  # twice
        ask(11, "unmask", **{wire.SECAGG_SURVIVORS: [], wire.SECAGG_DROPPED: [12]})
