"""Property: no finite, well-formed reply of any magnitude breaks or steers a round (issue 30).

Every strategy with the default defences (max-update-ratio 10 on delta W and on the factors,
max-share 0.5) meets one to three hostile replies among four honest ones, whose values are
any magnitude float32 can carry: zero, subnormal, tiny, huge, the largest finite value, in
the shapes that dodge one screen or the other (a huge A with a zero B, and the reverse). The
round never raises, the global adapter stays finite, and it moves by at most what an accepted
reply may: each global factor by max-update-ratio x the round's lower median factor change
(merges that average the factors: a convex combination of accepted changes), the global
delta W by twice max-update-ratio x the lower median delta-W change (merges of products; a
re-factoring to the global rank at most doubles the distance).

With mixed ranks (the rank-heterogeneous strategies, honest and hostile clients at ranks 2
and 4 under a global rank of 4) the same holds up to what a client did not receive: a rank-r
client's change is measured from the global adapter cut to rank r, so each bound grows by the
largest distance between the global adapter and what a client of the round received (in
factors, or in delta W for merges of products)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_robust import honest, loop_of, one_round, reply, shared_only
from test_validation import SHAPES

from fedlora.adapters import flatten, shared_init
from fedlora.aggregation.linalg import pad_rank
from fedlora.aggregation.privacy import factor_distance
from fedlora.config import LoraSettings
from fedlora.factors import A_SUFFIX, B_SUFFIX
from fedlora.methods import get_method
from server.defences import Robust
from server.global_adapter import GlobalAdapter
from server.record import Node
from server.rounds import RoundLoop, Rules

FACTOR_MEANS = ("fedavg", "fedprox", "ffa-lora", "fedsa-lora", "hetlora")
PRODUCTS = ("flexlora", "flora", "fedex-lora")
MAGNITUDES = (0.0, 1e-45, 1e-38, 1e-10, 1.0, 1e10, 1e30, 3.4e38, -3.4e38)
KINDS = ("constant", "a-huge-b-zero", "b-huge-a-zero", "scaled")
RATIO = 10.0
MIXED = ("hetlora", "ffa-lora", "flexlora", "flora")  # the rank-heterogeneous strategies
MIXED_RANKS = (2, 4)  # client ranks under a global rank of 4


def state_at(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """An honest reply at `rank` (at rank 2 test_validation's good_state(seed))."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in
            flatten(shared_init(SHAPES, rank, seed=0)).items()}


def hostile_state(kind: str, magnitude: float, seed: int, rank: int = 2
                  ) -> dict[str, torch.Tensor]:
    """A well-formed reply at `rank`, every value finite in float32, shaped to dodge a
    screen."""
    state = state_at(seed, rank)
    full = lambda v: torch.full_like(v, magnitude)
    if kind == "constant":
        return {k: full(v) for k, v in state.items()}
    if kind == "scaled":
        return {k: (v.double() * magnitude).clamp(-3.4e38, 3.4e38).float()
                for k, v in state.items()}
    huge, zero = (A_SUFFIX, B_SUFFIX) if kind == "a-huge-b-zero" else (B_SUFFIX, A_SUFFIX)
    return {k: full(v) if k.endswith(huge) else torch.zeros_like(v) for k, v in state.items()}


def delta_w(factors: dict, residual: dict) -> dict[str, torch.Tensor]:
    """The delta W of a global adapter plus its frozen residual, per module (float64)."""
    out = {m: b.double() @ a.double() for m, (b, a) in factors.items()}
    for m, (b, a) in residual.items():
        out[m] = out.get(m, 0) + b.double() @ a.double()
    return out


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(strategy=st.sampled_from(FACTOR_MEANS + PRODUCTS), kind=st.sampled_from(KINDS),
       magnitude=st.sampled_from(MAGNITUDES), hostile=st.integers(1, 3))
def test_no_reply_value_breaks_or_steers_a_round(strategy, kind, magnitude, hostile):
    loop = loop_of(strategy, max_share=0.5)
    loop.nodes.update({n: Node(n, rank=2) for n in (6, 7)})
    one_round(loop, honest(strategy))  # a global adapter that is not zero
    before, before_w = dict(loop.state.factors), delta_w(loop.state.factors,
                                                         loop.state.residual)
    bad = [reply(shared_only(hostile_state(kind, magnitude, 20 + i), strategy),
                 {"num-examples": 100, "lora-rank": 2}, node=5 + i) for i in range(hostile)]
    record = one_round(loop, [*honest(strategy), *bad])  # never raises
    after = loop.state.factors
    for b, a in [*after.values(), *loop.state.residual.values()]:
        assert bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())
    if strategy in FACTOR_MEANS:
        bound = RATIO * record.screen["factor-norm-median"]
        moved = factor_distance(after, before)
    else:
        bound = 2 * RATIO * record.screen["update-norm-median"]
        after_w = delta_w(after, loop.state.residual)
        moved = math.sqrt(sum(float((after_w[m] - before_w.get(m, 0)).square().sum())
                              for m in after_w))
    assert moved <= bound * (1 + 1e-6) + 1e-9, (strategy, kind, magnitude, moved, bound)


def mixed_loop(strategy: str, ranks: dict[int, int]) -> RoundLoop:
    """A round loop at global rank 4 whose nodes have `ranks` (node -> rank)."""
    state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=4),
                          factors=shared_init(SHAPES, 4, seed=0), global_rank=4,
                          robust=Robust("none"))
    loop = RoundLoop(state, SHAPES, Rules(timeout=10.0, max_share=0.5), writer=None)
    loop.nodes = {n: Node(n, rank=r) for n, r in ranks.items()}
    return loop


def at_rank(state: dict, strategy: str, rank: int, node: int, examples: int = 100):
    """`node`'s reply of `state` at `rank`, as `strategy` sends it."""
    return reply(shared_only(state, strategy), {"num-examples": examples, "lora-rank": rank},
                 node=node)


def not_received(loop: RoundLoop, ranks: list[int], products: bool) -> float:
    """The largest distance between the global adapter and what a client of one of `ranks`
    received: in delta W (with the residual) for merges of products, else in the factors."""
    state, worst = loop.state, 0.0
    full_w = delta_w(state.factors, state.residual)
    for rank in set(ranks):
        got = state.received(rank)
        if products:
            got_w = delta_w(got, state.residual)
            worst = max(worst, math.sqrt(sum(float((full_w[m] - got_w.get(m, 0)).square().sum())
                                             for m in full_w)))
        else:
            padded = {m: pad_rank(b, a, state.rank) for m, (b, a) in got.items()}
            worst = max(worst, factor_distance(state.factors, padded))
    return worst


HONEST_RANKS = {1: 2, 2: 4, 3: 2, 4: 4}


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(strategy=st.sampled_from(MIXED), kind=st.sampled_from(KINDS),
       magnitude=st.sampled_from(MAGNITUDES),
       hostile_ranks=st.lists(st.sampled_from(MIXED_RANKS), min_size=1, max_size=3))
def test_no_reply_value_breaks_or_steers_a_round_of_mixed_ranks(strategy, kind, magnitude,
                                                                hostile_ranks):
    ranks = {**HONEST_RANKS, **{5 + i: r for i, r in enumerate(hostile_ranks)}}
    loop = mixed_loop(strategy, ranks)
    honest_replies = lambda: [at_rank(state_at(n, r), strategy, r, n)
                              for n, r in HONEST_RANKS.items()]
    one_round(loop, honest_replies())  # a global adapter that is not zero
    products = strategy not in FACTOR_MEANS
    before, before_w = dict(loop.state.factors), delta_w(loop.state.factors,
                                                         loop.state.residual)
    missed = not_received(loop, list(ranks.values()), products)
    bad = [at_rank(hostile_state(kind, magnitude, 20 + i, r), strategy, r, 5 + i)
           for i, r in enumerate(hostile_ranks)]
    record = one_round(loop, [*honest_replies(), *bad])  # never raises
    after = loop.state.factors
    assert all(b.shape[1] == a.shape[0] == 4 for b, a in after.values())  # the global rank
    for b, a in [*after.values(), *loop.state.residual.values()]:
        assert bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())
    if products:
        bound = 2 * (RATIO * record.screen["update-norm-median"] + missed)
        after_w = delta_w(after, loop.state.residual)
        moved = math.sqrt(sum(float((after_w[m] - before_w.get(m, 0)).square().sum())
                              for m in after_w))
    else:
        bound = RATIO * record.screen["factor-norm-median"] + missed
        moved = factor_distance(after, before)
    assert moved <= bound * (1 + 1e-6) + 1e-9, (strategy, kind, magnitude, moved, bound)
