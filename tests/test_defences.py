"""The reply defences of server/defences.py as pure functions, against hand-computed numbers:
the update-norm screen, the weight cap, Krum, clipping and the DP noise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedlora.aggregation import ClientUpdate
from server import defences
from server.defences import Robust


def scalar(value: float, b: float = 1.0, weight: float = 1.0) -> ClientUpdate:
    """A rank-1 update of one 1 x 1 layer: B = [[b]], A = [[value]] (delta W = b x value)."""
    return ClientUpdate({"m": (torch.tensor([[b]], dtype=torch.float64),
                               torch.tensor([[value]], dtype=torch.float64))}, weight)


def test_an_update_100_times_the_median_norm_is_dropped_naming_the_ratio():
    screened = defences.screen_norms([1.0, 1.0, 1.0, 100.0], ratio=10.0)
    assert screened.kept == (0, 1, 2)
    [(index, reason)] = screened.dropped
    assert index == 3
    assert reason == ("update norm 100 is 100 times the round's lower median 1 "
                      "(max-update-ratio=10)")
    assert screened.figures == {"update-norm-median": 1.0, "update-norm-bound": 10.0}


def test_the_norm_screen_compares_with_the_lower_median_of_an_even_count():
    # sorted 1, 1.5, 2, 15, 16, 40: the lower median is 2 (not 8.5), the bound 20
    screened = defences.screen_norms([2.0, 1.0, 16.0, 1.5, 15.0, 40.0], ratio=10.0)
    assert screened.figures == {"update-norm-median": 2.0, "update-norm-bound": 20.0}
    assert [i for i, _ in screened.dropped] == [5]  # 40 > 20; 16 and 15 pass
    assert screened.kept == (0, 1, 2, 3, 4)


def test_the_norm_screen_off_keeps_everything_and_has_no_bound():
    screened = defences.screen_norms([1.0, 1e30], ratio=0.0)
    assert screened.kept == (0, 1) and screened.dropped == ()
    assert screened.figures["update-norm-bound"] is None


def test_a_claim_above_the_weight_ratio_times_the_lower_median_is_cut_to_it():
    weighed = defences.weigh([100.0, 100.0, 100.0, 10_000_000.0], ratio=10.0, equal=False)
    assert weighed.weights == (100.0, 100.0, 100.0, 1000.0)
    assert weighed.cut == ((3, "num-examples 1e+07 cut to 1000, max-weight-ratio=10 times "
                               "the round's lower median"),)
    assert weighed.figures == {"weight-cap": 1000.0}


def test_the_weight_cap_uses_the_smaller_middle_claim():
    # claims 10, 20, 300, 400: lower median 20, cap 2 x 20 = 40
    weighed = defences.weigh([10.0, 20.0, 300.0, 400.0], ratio=2.0, equal=False)
    assert weighed.weights == (10.0, 20.0, 40.0, 40.0)
    assert [i for i, _ in weighed.cut] == [2, 3]


def test_equal_weights_weigh_one_each_and_cut_nothing():
    weighed = defences.weigh([100.0, 10_000_000.0], ratio=10.0, equal=True)
    assert weighed.weights == (1.0, 1.0) and weighed.cut == ()
    assert weighed.figures == {"weight-cap": None}


def test_krum_keeps_n_minus_f_and_drops_the_farthest_with_its_score():
    # delta W 0, 1, 2, 100; n - f - 2 = 1 neighbour: scores 1, 1, 1 and (100 - 2)^2 = 9604
    screened = defences.krum([scalar(v) for v in (0.0, 1.0, 2.0, 100.0)], f=1)
    assert screened.kept == (0, 1, 2)
    assert screened.scores == pytest.approx((1.0, 1.0, 1.0, 9604.0))
    [(index, reason)] = screened.dropped
    assert index == 3
    assert reason.startswith("not merged: krum score 9604 ")
    assert reason.endswith("above the 3 kept, the highest of which is 1 (robust-f=1)")


def test_krum_judges_delta_w_not_the_factors():
    # B A = 2 x 1 = 1 x 2: the same delta W in another gauge is not set aside
    updates = [scalar(1.0), scalar(1.0, b=2.0), scalar(2.0), scalar(50.0)]
    assert defences.krum(updates, f=1).kept == (0, 1, 2)


def test_clipping_scales_the_change_to_the_clip_norm_around_what_was_received():
    zero = {"m": (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))}
    big = scalar(4.0, b=3.0, weight=50.0)  # ||(3, 4)|| = 5
    small = scalar(0.3, b=0.4, weight=20.0)  # ||(0.4, 0.3)|| = 0.5
    out, figures = defences.clip([big, small], [zero, zero], {}, clip_norm=1.0, equal=False)
    b, a = out[0].factors["m"]
    assert (float(b), float(a)) == pytest.approx((0.6, 0.8))
    assert out[1].factors is small.factors  # within the norm: untouched
    assert [u.weight for u in out] == [50.0, 20.0]
    assert figures["update-norms"] == pytest.approx([5.0, 0.5])
    assert figures["clients-clipped"] == 1 and figures["clip-norm"] == 1.0
    dp, _ = defences.clip([big, small], [zero, zero], {}, clip_norm=1.0, equal=True)
    assert [u.weight for u in dp] == [1.0, 1.0]
    # hetlora's norms measured on arrival describe the reply's factors, not the clipped ones
    measured = replace(big, norms={"m": 12.0})
    assert defences.clip([measured], [zero], {}, clip_norm=1.0, equal=False)[0][0].norms is None


def test_noise_has_std_z_c_over_the_clients_merged_into_each_tensor():
    merged = {"m": (torch.zeros(200, 100), torch.zeros(1, 100))}
    dense = {"expert": torch.zeros(20_000)}
    noisy, tensors, std = defences.noised(merged, dense, "both", clients=4,
                                          contributors={"expert": 1}, clip_norm=2.0,
                                          noise_multiplier=1.0, seed=7)
    assert std == 0.5  # 1 x 2 / 4
    assert float(noisy["m"][0].std()) == pytest.approx(0.5, rel=0.05)
    assert float(tensors["expert"].std()) == pytest.approx(2.0, rel=0.05)  # 1 x 2 / 1
    again, _, _ = defences.noised(merged, dense, "both", 4, {"expert": 1}, 2.0, 1.0, seed=7)
    assert torch.equal(again["m"][0], noisy["m"][0])  # the seed fixes the noise


def test_noise_leaves_a_factor_the_method_does_not_share():
    merged = {"m": (torch.zeros(3, 2), torch.ones(2, 4))}
    noisy, _, _ = defences.noised(merged, {}, "B", 2, {}, 1.0, 1.0, seed=0)
    assert torch.equal(noisy["m"][1], torch.ones(2, 4))
    assert float(noisy["m"][0].abs().sum()) > 0


@pytest.mark.parametrize(("rule", "krum", "replaces"), [
    ("none", False, False), ("krum", True, False), ("median", False, True),
    ("trimmed-mean", False, True)])
def test_robust_says_who_applies_the_rule(rule, krum, replaces):
    assert (Robust(rule).krum, Robust(rule).replaces_merge) == (krum, replaces)
