"""Property: no finite, well-formed reply of any magnitude breaks or steers a round (issue 30).

Every strategy with the default defences (max-update-ratio 10 on delta W and on the factors,
max-share 0.5) meets one to three hostile replies among four honest ones, whose values are
any magnitude float32 can carry: zero, subnormal, tiny, huge, the largest finite value, in
the shapes that dodge one screen or the other (a huge A with a zero B, and the reverse). The
round never raises, the global adapter stays finite, and it moves by at most what an accepted
reply may: each global factor by max-update-ratio x the round's lower median factor change
(merges that average the factors: a convex combination of accepted changes), the global
delta W by twice max-update-ratio x the lower median delta-W change (merges of products; a
re-factoring to the global rank at most doubles the distance)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_robust import honest, loop_of, one_round, reply, shared_only
from test_validation import good_state

from fedlora.aggregation.privacy import factor_distance
from fedlora.factors import A_SUFFIX, B_SUFFIX
from server.record import Node

FACTOR_MEANS = ("fedavg", "fedprox", "ffa-lora", "fedsa-lora", "hetlora")
PRODUCTS = ("flexlora", "flora", "fedex-lora")
MAGNITUDES = (0.0, 1e-45, 1e-38, 1e-10, 1.0, 1e10, 1e30, 3.4e38, -3.4e38)
KINDS = ("constant", "a-huge-b-zero", "b-huge-a-zero", "scaled")
RATIO = 10.0


def hostile_state(kind: str, magnitude: float, seed: int) -> dict[str, torch.Tensor]:
    """A well-formed reply, every value finite in float32, shaped to dodge a screen."""
    state = good_state(seed)
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
