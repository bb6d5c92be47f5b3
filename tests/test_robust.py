"""Defences against hostile clients: the screens on by default, median, trimmed mean and Krum
on delta W against hand-computed numbers and dense oracles, their gauge invariance, and the
well-formed hostile reply of issue 17 through the round loop with default settings."""

from __future__ import annotations

import math

import pytest
import torch
from test_validation import SHAPES, good_state
from test_validation import reply as content_of

from fedlora.adapters import shared_init
from fedlora.aggregation import ClientUpdate
from fedlora.aggregation import robust as R
from fedlora.config import LoraSettings, SettingsError
from fedlora.factors import A_SUFFIX, B_SUFFIX
from fedlora.methods import get_method, load
from server.defences import Robust
from server.global_adapter import GlobalAdapter
from server.record import Node, RoundRecord
from server.rounds import RoundLoop, Rules


def scalar_updates(values: list[list[float]]) -> list[ClientUpdate]:
    """Rank-1 updates of one 1 x k layer whose delta W is the given row: B = [[1]], A = row."""
    return [ClientUpdate({"m": (torch.ones(1, 1, dtype=torch.float64),
                                torch.tensor([row], dtype=torch.float64))}, 1.0)
            for row in values]


def random_updates(n: int, ranks: list[int], d: int = 12, k: int = 9, seed: int = 0
                   ) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [ClientUpdate({"m": (torch.randn(d, r, generator=gen, dtype=torch.float64),
                                torch.randn(r, k, generator=gen, dtype=torch.float64)),
                          "n": (torch.randn(5, r, generator=gen, dtype=torch.float64),
                                torch.randn(r, 7, generator=gen, dtype=torch.float64))},
                         float(10 + i)) for i, r in zip(range(n), ranks * n)]


def regauged(update: ClientUpdate, seed: int) -> ClientUpdate:
    """The same delta W with factors (B G, G^-1 A) for a random invertible G."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m, (b, a) in update.factors.items():
        g = torch.randn(b.shape[1], b.shape[1], generator=gen, dtype=torch.float64)
        g = g + 3 * torch.eye(b.shape[1], dtype=torch.float64)
        out[m] = (b @ g, torch.linalg.solve(g, a))
    return ClientUpdate(out, update.weight)


def reply(state: dict, metrics: dict, node: int):
    """A training reply as the round loop reads it (no error, the sender's node id)."""
    msg = content_of(state, metrics, node=node)
    msg.has_error = lambda: False
    return msg


def product(result_factors, module):
    b, a = result_factors[module]
    return b.double() @ a.double()


# ---------------------------------------------------------------- screens


def test_lower_median_takes_the_smaller_middle_value():
    assert R.lower_median([3.0, 1.0, 2.0]) == 2.0
    assert R.lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert R.lower_median([5.0, 1e30]) == 5.0  # of two clients, the hostile one sets nothing


def test_outliers_are_the_norms_above_ratio_times_the_lower_median():
    bound, far = R.outliers([1.0, 1.2, 0.9, 1e30], ratio=10)
    assert bound == 10.0 and far == [3]
    assert R.outliers([0.0, 0.0, 0.0], ratio=10) == (math.inf, [])  # no scale: no bound
    assert R.outliers([0.0, 0.0, 5.0], ratio=10) == (50.0, [])  # still replies set nothing
    assert R.outliers([1.0, 50.0], ratio=0) == (math.inf, [])  # off


def test_a_nan_or_infinite_norm_is_never_within_bound_and_sets_no_median():
    # a NaN among the norms made the old lower median NaN, and then nobody was dropped
    bound, far = R.outliers([1.0, 1.1, math.nan, 0.9, 1000.0], ratio=10)
    assert bound == 10.0 and far == [2, 4]
    assert R.outliers([1.0, math.inf, math.nan], ratio=0) == (math.inf, [1, 2])  # screen off
    assert R.outliers([math.nan, math.nan], ratio=10) == (math.inf, [0, 1])


def test_replies_returned_unchanged_do_not_set_the_scale():
    # three no-op replies whose norm reads 4e-7 by rounding, two that trained: the old lower
    # median was 4e-7, so the two that trained were dropped
    norms = [4e-7, 3e-7, 5e-7, 1.0, 1.2]
    assert R.outliers(norms, ratio=10)[1] == [3, 4]  # without the floor: dropped
    assert R.outliers(norms, ratio=10, still=1e-6) == (10.0, [])


def test_weights_are_cut_to_ratio_times_the_lower_median():
    assert R.cap_weights([100, 100, 100, 10_000_000], 10) == ([100, 100, 100, 1000], 1000)
    assert R.cap_weights([1, 50], 0) == ([1, 50], math.inf)


def test_shares_are_capped_and_the_excess_goes_to_the_others_by_weight():
    # the numbers: honest 54 and 72 (and 60), a claim of 10,000,000 cut to 720 by the
    # weight cap still held 0.79 of the merge; max-share 0.5 holds it to one half
    capped, _ = R.cap_weights([54, 72, 60, 10_000_000], 10)
    assert capped[3] / sum(capped) > 0.75
    shares = [w / sum(capped) for w in R.cap_shares(capped, 0.5)]
    assert shares[3] == pytest.approx(0.5)
    assert shares[:3] == pytest.approx([0.5 * w / 186 for w in (54, 72, 60)])
    assert sum(R.cap_shares(capped, 0.5)) == pytest.approx(sum(capped))
    # two over the cap: both cut, the rest share what is left by weight
    shares = [w / 100 for w in R.cap_shares([40, 40, 10, 10], 0.3)]
    assert shares == pytest.approx([0.3, 0.3, 0.2, 0.2])
    # cutting one can push another over: water-filling cuts it too
    shares = [w / 100 for w in R.cap_shares([60, 30, 5, 5], 0.35)]
    assert shares == pytest.approx([0.35, 0.35, 0.15, 0.15])
    assert R.cap_shares([90, 10], 0.4) == pytest.approx([50, 50])  # 1/n when the cap is below it
    assert R.cap_shares([90, 10], 1.0) == [90, 10]  # off


def test_change_norm_equals_the_dense_norm_of_the_moved_delta_w():
    new, ref = random_updates(2, [3, 2])
    dense = math.sqrt(sum(float((product(new.factors, m) - product(ref.factors, m)).square()
                                .sum()) for m in new.factors))
    assert R.change_norm(new.factors, ref.factors) == pytest.approx(dense, rel=1e-10)
    alone = math.sqrt(sum(float(product(new.factors, m).square().sum()) for m in new.factors))
    assert R.change_norm(new.factors, {}) == pytest.approx(alone, rel=1e-10)  # fresh adapter


# ---------------------------------------------------------------- Krum


def test_squared_distances_match_dense_ones_with_mixed_ranks():
    updates = random_updates(4, [2, 5, 3])
    got = R.squared_distances([u.factors for u in updates])
    for i, ui in enumerate(updates):
        for j, uj in enumerate(updates):
            dense = sum(float((product(ui.factors, m) - product(uj.factors, m)).square().sum())
                        for m in ui.factors)
            assert float(got[i, j]) == pytest.approx(dense, rel=1e-9, abs=1e-9)


def test_krum_by_hand_keeps_the_three_clustered_clients():
    # delta W = 0, 1, 2, 100: each has one neighbour (n - f - 2 = 1); scores 1, 1, 1, 98^2
    updates = scalar_updates([[0.0], [1.0], [2.0], [100.0]])
    scores = R.krum_scores(R.squared_distances([u.factors for u in updates]), f=1)
    assert scores == pytest.approx([1.0, 1.0, 1.0, 98.0 ** 2])
    assert R.krum_select(scores, f=1) == [0, 1, 2]


# ---------------------------------------------------------------- median and trimmed mean


def test_median_and_trimmed_mean_by_hand():
    rows = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0], [4.0, 40.0]]
    median = R.robust_merge(scalar_updates(rows), "median", f=1, rank=1)
    assert product(median.global_factors, "m").flatten().tolist() == pytest.approx([3.0, 20.0])
    # trimmed mean, f=1: the mean of the middle three of each column
    trimmed = R.robust_merge(scalar_updates(rows), "trimmed-mean", f=1, rank=1)
    assert product(trimmed.global_factors, "m").flatten().tolist() == pytest.approx(
        [3.0, 20.0])
    # an even count: the median is the mean of the two middle values
    even = R.robust_merge(scalar_updates(rows[:4]), "median", f=1, rank=1)
    assert product(even.global_factors, "m").flatten().tolist() == pytest.approx([2.5, 15.0])
    f2 = R.robust_merge(scalar_updates([[1.0], [2.0], [3.0], [9.0], [-50.0]]), "trimmed-mean",
                        f=2, rank=1)
    assert float(product(f2.global_factors, "m")) == pytest.approx(2.0)


def test_the_randomised_refactoring_is_seeded_and_leaves_the_global_generator_alone():
    # a flat spectrum: the randomised SVD's top 2 of 256 depend on its random start
    dense = torch.randn(256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(1)
    fresh = torch.random.get_rng_state()
    b1, a1, _ = R.refactor(dense, 2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), fresh)  # its draws are not the run's
    torch.manual_seed(2)
    b2, a2, _ = R.refactor(dense, 2, seed=7)
    assert torch.equal(b1, b2) and torch.equal(a1, a2)  # the global generator changes nothing
    b3, a3, _ = R.refactor(dense, 2, seed=8)
    assert not torch.allclose(b3 @ a3, b1 @ a1, rtol=1e-3, atol=1e-6)  # the seed does matter


def test_median_of_dense_oracle_and_refactored_to_the_global_rank():
    updates = random_updates(5, [2, 3])
    got = R.robust_merge(updates, "median", f=1, rank=15)  # rank >= 12 x 9: nothing dropped
    for m in updates[0].factors:
        stacked = torch.stack([product(u.factors, m) for u in updates])
        oracle = stacked.median(dim=0).values  # odd n: the middle value
        assert torch.allclose(product(got.global_factors, m), oracle, atol=1e-5)
    assert got.info["dropped"] == pytest.approx(0.0, abs=1e-7)


def test_trimmed_mean_without_trimming_is_the_unweighted_average_flexlora_makes():
    updates = [ClientUpdate(u.factors, 1.0) for u in random_updates(3, [2, 3])]
    robust = R.robust_merge(updates, "trimmed-mean", f=0, rank=8)
    flex = get_method("flexlora").merge(updates, {}, export_rank=8)
    for m in updates[0].factors:
        assert torch.allclose(product(robust.global_factors, m), product(flex.global_factors, m),
                              atol=1e-5)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_every_rule_ignores_the_factor_gauge(rule):
    updates = random_updates(5, [3, 2])
    turned = [regauged(u, seed=i) for i, u in enumerate(updates)]
    if rule == "krum":
        one = R.krum_scores(R.squared_distances([u.factors for u in updates]), f=1)
        two = R.krum_scores(R.squared_distances([u.factors for u in turned]), f=1)
        assert one == pytest.approx(two, rel=1e-8)
        return
    one = R.robust_merge(updates, rule, f=1, rank=4)
    two = R.robust_merge(turned, rule, f=1, rank=4)
    for m in updates[0].factors:
        assert torch.allclose(product(one.global_factors, m), product(two.global_factors, m),
                              atol=1e-5)


def test_raw_factor_median_would_depend_on_the_gauge():
    """Why the rules act on delta W: the median of the B's and of the A's moves with G."""
    updates = random_updates(3, [2])
    turned = [regauged(u, seed=i) for i, u in enumerate(updates)]

    def naive(us):
        b = torch.stack([u.factors["m"][0] for u in us]).median(dim=0).values
        a = torch.stack([u.factors["m"][1] for u in us]).median(dim=0).values
        return b @ a
    assert not torch.allclose(naive(updates), naive(turned), atol=1e-3)


def test_the_randomised_refactoring_is_exact_on_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(3)  # 40 x 30, rank 3: 13 columns, the svd_lowrank path
    dense = (torch.randn(40, 3, generator=gen, dtype=torch.float64)
             @ torch.randn(3, 30, generator=gen, dtype=torch.float64))
    b, a, dropped = R.refactor(dense, rank=3)
    assert torch.allclose(b @ a, dense, atol=1e-8) and dropped == pytest.approx(0, abs=1e-6)


def test_the_randomised_refactoring_of_a_median_is_the_best_rank_r_approximation():
    """A median of noisy low-rank updates is full rank; its randomised rank-4 re-factoring
    leaves no more error than the exact truncated SVD (Eckart-Young) but for rounding."""
    gen = torch.Generator().manual_seed(4)
    b0, a0 = (torch.randn(80, 4, generator=gen, dtype=torch.float64),
              torch.randn(4, 70, generator=gen, dtype=torch.float64))
    pairs = [(b0 + 0.3 * torch.randn(80, 4, generator=gen, dtype=torch.float64),
              a0 + 0.3 * torch.randn(4, 70, generator=gen, dtype=torch.float64))
             for _ in range(5)]
    dense = R.robust_delta_w(pairs, trim=2)
    b, a, dropped = R.refactor(dense, rank=4)
    best = float(torch.linalg.svdvals(dense)[4:].square().sum().sqrt())
    assert float((dense - b @ a).norm()) <= best * (1 + 1e-9)
    assert dropped == pytest.approx(best / float(dense.norm()), rel=1e-9)


def test_the_median_is_built_in_blocks_of_rows(monkeypatch):
    updates = random_updates(3, [2])
    whole = R.robust_merge(updates, "median", f=1, rank=6)
    monkeypatch.setattr(R, "BLOCK_ENTRIES", 20)  # 3 clients x 9 columns: one row a block
    blocks = R.robust_merge(updates, "median", f=1, rank=6)
    for m in updates[0].factors:
        assert torch.allclose(product(whole.global_factors, m), product(blocks.global_factors, m),
                              atol=1e-6)


# ---------------------------------------------------------------- through the round loop


def loop_of(strategy: str, robust: str = "none", **rules) -> RoundLoop:
    """A round loop over test_validation's two layers with default rules, nodes 1..4 at rank 2."""
    state = GlobalAdapter(method=get_method(strategy), lora=LoraSettings(rank=2),
                          factors=shared_init(SHAPES, 2, seed=0), global_rank=2,
                          robust=Robust(robust))
    loop = RoundLoop(state, SHAPES, Rules(timeout=10.0, **rules), writer=None)
    loop.nodes = {n: Node(n, rank=2) for n in (1, 2, 3, 4, 5)}
    return loop


def one_round(loop: RoundLoop, replies: list) -> RoundRecord:
    """Read, screen and merge one round's replies as `RoundLoop.train_round` does."""
    record = RoundRecord(1)
    for msg in replies:
        loop.read_train_reply(msg.metadata.src_node_id, msg, record)
    loop.screen(record)
    loop.merge(1, record)
    return record


HONEST = [reply(good_state(seed), {"num-examples": 100, "lora-rank": 2}, node=seed)
          for seed in (1, 2, 3)]
HOSTILE = reply({k: torch.full_like(v, 1e30) for k, v in good_state(4).items()},
                {"num-examples": 10_000_000, "lora-rank": 2}, node=4)


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora", "flora", "hetlora"])
def test_the_1e30_reply_claiming_10m_examples_is_dropped_by_default(strategy):
    """Issue 17's reply (all factors 1e30, num-examples at the default cap) passes validation,
    and with the default settings the global adapter is bitwise the honest clients' merge."""
    clean, attacked = loop_of(strategy), loop_of(strategy)
    one_round(clean, HONEST)
    record = one_round(attacked, [*HONEST, HOSTILE])
    assert [r.row["node-id"] for r in record.replies] == [1, 2, 3]
    [failure] = record.failures
    assert failure["node-id"] == 4 and "times the round's lower median" in failure["reason"]
    assert "max-update-ratio=10" in failure["reason"]
    for mine, theirs in ((clean.state.factors, attacked.state.factors),
                         (clean.state.residual, attacked.state.residual)):
        assert mine.keys() == theirs.keys()
        for m in mine:
            assert torch.equal(mine[m][0], theirs[m][0]) and torch.equal(mine[m][1], theirs[m][1])


def test_an_inflated_claim_is_cut_and_reported_with_its_figure():
    honest_looking = reply(good_state(4), {"num-examples": 10_000_000, "lora-rank": 2}, node=4)
    loop = loop_of("fedavg")
    record = one_round(loop, [*HONEST, honest_looking])
    assert [r.update.weight for r in record.replies] == [100, 100, 100, 1000]
    [entry] = record.down_weighted
    assert entry["node-id"] == 4 and "num-examples 1e+07 cut to 1000" in entry["reason"]
    line = record.line(0)
    assert line["weight-cap"] == 1000 and line["clients"][3]["weight"] == 1000
    assert all(c["update-norm"] > 0 for c in line["clients"])


def test_equal_weights_leave_nothing_to_inflate():
    honest_looking = reply(good_state(4), {"num-examples": 10_000_000, "lora-rank": 2}, node=4)
    record = one_round(loop_of("fedavg", equal_weights=True), [*HONEST, honest_looking])
    assert [r.update.weight for r in record.replies] == [1.0] * 4
    assert record.down_weighted == [] and record.line(0)["weight-cap"] is None


def test_krum_tolerating_nobody_keeps_everyone():
    updates = random_updates(4, [2, 3])
    scores = R.krum_scores(R.squared_distances([u.factors for u in updates]), f=0)
    assert R.krum_select(scores, f=0) == [0, 1, 2, 3]


def test_with_the_screens_off_the_hostile_reply_takes_over():
    """What the defaults prevent: with both ratios at 0 the merge is ~1e30 (fedavg)."""
    loop = loop_of("fedavg", max_update_ratio=0.0, max_weight_ratio=0.0)
    one_round(loop, [*HONEST, HOSTILE])
    assert max(float(b.abs().max()) for b, _ in loop.state.factors.values()) > 1e29


def test_krum_in_the_loop_leaves_out_the_far_client_and_names_it():
    scaled = reply({k: v * 30 for k, v in good_state(4).items()},
                   {"num-examples": 100, "lora-rank": 2}, node=4)
    loop = loop_of("flexlora", robust="krum", max_update_ratio=0.0, min_replies=4)
    record = one_round(loop, [*HONEST, reply(good_state(5), {"num-examples": 100,
                                                             "lora-rank": 2}, node=5), scaled])
    merged = {c["node-id"]: c["merged"] for c in record.line(0)["clients"]}
    assert merged == {1: True, 2: True, 3: True, 5: True, 4: False}
    [entry] = record.down_weighted
    assert entry["node-id"] == 4 and "not merged: krum score" in entry["reason"]
    clean = loop_of("flexlora")
    one_round(clean, [*HONEST, reply(good_state(5), {"num-examples": 100, "lora-rank": 2},
                                     node=5)])
    for m, (b, a) in clean.state.factors.items():
        assert torch.allclose(b @ a, loop.state.factors[m][0] @ loop.state.factors[m][1],
                              atol=1e-6)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("config, fragment", [
    ({"strategy": "ffa-lora", "robust": "median"}, "use it with fedavg, fedprox, fedsa-lora, "
                                                   "flexlora"),
    ({"robust": "median", "clip-norm": 1.0, "dp-noise-multiplier": 1.0},
     "DP accountant does not cover"),
    ({"robust": "trimmed-mean", "server-optimizer": "fedadam", "min-replies": 3},
     "set server-optimizer=none"),
    ({"robust": "krum"}, "needs at least 4 replies per round, but a round may be merged "
                         "with 2"),
    ({"robust": "median", "robust-f": 2, "min-replies": 4}, "needs at least 5 replies"),
    ({"robust": "mean"}, "setting 'robust': expected one of none, median, trimmed-mean, krum"),
    ({"max-update-ratio": 0.5}, "expected 0 (off) or a number >= 1"),
    ({"attack": "flood"}, "setting 'attack': expected one of none, scale"),
])
def test_settings_that_do_not_fit_are_refused(config, fragment):
    with pytest.raises(SettingsError, match=None) as err:
        load({"fraction-evaluate": 0.0, **config})
    assert fragment in str(err.value)


def test_fitting_robust_settings_load():
    settings, method = load({"robust": "krum", "min-replies": 4, "strategy": "flora"})
    assert settings.defence.robust == "krum" and method.name == "flora"
    assert load({"robust": "median", "min-replies": 3})[0].defence.replies_needed() == 3


# ---------------------------------------------------------------- replies hostile by value
# (issue 30: finite, well-formed replies that passed validation and still broke a round)


def shared_only(state: dict, strategy: str) -> dict:
    """The keys a reply of `strategy` carries (ffa-lora sends B only, fedsa-lora A only)."""
    shares = get_method(strategy).shares
    suffixes = {"both": (A_SUFFIX, B_SUFFIX), "A": (A_SUFFIX,), "B": (B_SUFFIX,)}[shares]
    return {k: v for k, v in state.items() if k.endswith(suffixes)}


def honest(strategy: str, examples=(100, 100, 100, 100)) -> list:
    return [reply(shared_only(good_state(node), strategy),
                  {"num-examples": n, "lora-rank": 2}, node=node)
            for node, n in zip((1, 2, 3, 4), examples)]


@pytest.mark.parametrize("strategy", ["fedavg", "hetlora", "flora", "fedex-lora", "ffa-lora",
                                      "flexlora"])
def test_a_b_that_overflows_at_the_merge_scale_is_dropped_and_the_adapter_stays_finite(
        strategy):
    """B = 3e38 is finite in float32 at PEFT's scale, and inf once the scale (alpha/r = 8) is
    folded in: the global adapter became non-finite, and flexlora's SVD raised."""
    big = {k: torch.full_like(v, 3e38) if k.endswith(B_SUFFIX) else v
           for k, v in good_state(5).items()}
    loop = loop_of(strategy)
    record = one_round(loop, [*honest(strategy), reply(shared_only(big, strategy),
                                                      {"num-examples": 100, "lora-rank": 2},
                                                      node=5)])
    [failure] = record.failures
    assert failure["node-id"] == 5 and "not finite at the merge's scale" in failure["reason"]
    assert [r.row["node-id"] for r in record.replies] == [1, 2, 3, 4]
    for b, a in [*loop.state.factors.values(), *loop.state.residual.values()]:
        assert bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())


def test_fedsa_lora_is_screened_on_the_a_it_merges():
    """Its update norm read B A with the server's B at zero: every norm was 0, no bound, and
    one A of 1e30 made the global A 2e29."""
    hostile = {k: torch.full_like(v, 1e30) for k, v in good_state(5).items()
               if k.endswith(A_SUFFIX)}
    loop = loop_of("fedsa-lora")
    record = one_round(loop, [*honest("fedsa-lora"),
                              reply(hostile, {"num-examples": 100, "lora-rank": 2}, node=5)])
    [failure] = record.failures
    assert failure["node-id"] == 5 and "times the round's lower median" in failure["reason"]
    assert max(float(a.abs().max()) for _, a in loop.state.factors.values()) < 10
    assert record.screen["update-norm-median"] > 0


def test_replies_returned_unchanged_do_not_get_the_clients_that_trained_dropped():
    loop = loop_of("fedavg")
    one_round(loop, honest("fedavg"))  # a global adapter that is not zero
    gen = torch.Generator().manual_seed(9)
    received = loop.state.payload(2)
    still = [reply({k: v + 1e-9 * torch.randn(v.shape, generator=gen) for k, v in
                    received.items()}, {"num-examples": 100, "lora-rank": 2}, node=node)
             for node in (1, 2, 3)]  # returned as received, to rounding
    trained = [reply(good_state(node + 10), {"num-examples": 100, "lora-rank": 2}, node=node)
               for node in (4, 5)]
    record = one_round(loop, [*still, *trained])
    assert record.failures == []  # the old lower median was a no-op's: both trainers dropped
    assert record.screen["update-norm-median"] > 1e-3


def test_one_liar_carries_at_most_max_share_of_the_merge():
    """Claims of 54, 72 and 60 examples and one of 10,000,000: cut by the
    weight cap (600 here: 10 x the lower median 60), still carried 0.76 of the merge."""
    loop = loop_of("fedavg", max_share=0.5)
    record = one_round(loop, [*honest("fedavg", (54, 72, 60, 10_000_000))])
    weights = {r.row["node-id"]: r.row["weight"] for r in record.replies}
    assert weights[4] / sum(weights.values()) == pytest.approx(0.5)
    [cut] = [d for d in record.down_weighted if d["node-id"] == 4]
    assert "cut to 600" in cut["reason"] and "max-share=0.5" in cut["reason"]
    assert weights[1] / weights[2] == pytest.approx(54 / 72)  # the rest keep their proportions


@pytest.mark.parametrize("strategy", ["fedavg", "hetlora"])
def test_a_huge_a_with_a_zero_b_is_dropped_where_the_merge_averages_factors(strategy):
    """B = 0, A = 1e30: delta W does not move, so the delta-W screen passes it, and the mean
    of the A's became 2e29. The factor screen drops it."""
    gauge = {k: torch.zeros_like(v) if k.endswith(B_SUFFIX) else torch.full_like(v, 1e30)
             for k, v in good_state(5).items()}
    loop = loop_of(strategy)
    record = one_round(loop, [*honest(strategy),
                              reply(gauge, {"num-examples": 100, "lora-rank": 2}, node=5)])
    [failure] = record.failures
    assert failure["node-id"] == 5 and failure["reason"].startswith("factor change")
    assert max(float(t.abs().max()) for f in loop.state.factors.values() for t in f) < 10


def test_a_node_is_named_by_its_key_and_its_own_name_is_shown_beside():
    """Names were self-declared: the holder of site-d's key started with --name site-a was
    written to metrics.jsonl as site-a, and site-a was blamed for site-d's claim."""
    loop = loop_of("fedavg")
    loop.keys = {1: "site-a", 2: "site-b", 3: "site-c", 4: "site-d"}
    loop.nodes[4].name = "site-a"  # what the holder of site-d's key calls itself
    record = one_round(loop, [*honest("fedavg")[:3], reply(
        {k: torch.full_like(v, 1e30) for k, v in good_state(4).items()},
        {"num-examples": 100, "lora-rank": 2}, node=4)])
    [failure] = record.failures
    assert failure["node-id"] == 4 and failure["node-name"] == "site-d"
    assert loop.who(4) == "node 4 (site-d, calls itself site-a)"
    assert [r.row["node-name"] for r in record.replies] == ["site-a", "site-b", "site-c"]
    assert all("node-declared-name" not in r.row for r in record.replies)
    loop.nodes[5].name = "site-e"  # no key known (an insecure server): its own name
    assert loop.who(5) == "node 5 (site-e)"


def test_the_node_id_of_each_registered_key_is_kept_beside_the_run(tmp_path):
    from fedlora.runtime import node_keys

    out = "✅ SuperNode 8126384127 registered successfully.\n"
    assert node_keys.registered_id(out) == 8126384127
    assert node_keys.registered_id("SuperNode couldn't be registered.") is None
    assert node_keys.key_name(tmp_path / "certs" / "site-a.pub") == "site-a"
    node_keys.record(tmp_path, 8126384127, "site-a")
    node_keys.record(tmp_path, 17, "site-b")
    assert node_keys.read(tmp_path) == {17: "site-b", 8126384127: "site-a"}
    assert node_keys.read(tmp_path / "elsewhere") == {}


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_fedsa_lora_has_robust_rules_on_a(rule):
    """fedsa-lora had no robust rule at all; now each works on A (its clients keep B)."""
    load({"strategy": "fedsa-lora", "robust": rule, "min-replies": 4, "min-train-nodes": 4})
    hostile = {k: torch.full_like(v, 1e3) for k, v in good_state(5).items()
               if k.endswith(A_SUFFIX)}
    loop = loop_of("fedsa-lora", rule, max_update_ratio=0.0)  # the rule alone
    before_b = {m: b.clone() for m, (b, _) in loop.state.factors.items()}
    record = one_round(loop, [*honest("fedsa-lora"),
                              reply(hostile, {"num-examples": 100, "lora-rank": 2}, node=5)])
    assert max(float(a.abs().max()) for _, a in loop.state.factors.values()) < 1
    assert all(torch.equal(b, before_b[m]) for m, (b, _) in loop.state.factors.items())
    if rule == "krum":
        [entry] = record.down_weighted
        assert entry["node-id"] == 5 and "krum score" in entry["reason"]
