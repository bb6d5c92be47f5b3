"""Aggregation against hand-computed numbers: strategies, helpers, exactness, server optimisers."""

import math

import pytest
import torch

from fedlora.aggregation import SERVER_OPTIMIZERS, ClientUpdate
from fedlora.aggregation.exactness import compress, exactness, truncation_loss
from fedlora.aggregation.linalg import (
    change_figures,
    difference_norm,
    gram_product_norm,
    pad_rank,
    product_norm,
    reference_grams,
    stack,
    truncate_rank,
    truncate_svd,
)
from fedlora.config import lora_scale
from fedlora.factors import from_delta, to_delta
from fedlora.methods import METHODS, get_method, strategies_for


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def update(b, a, weight, module="m"):
    return ClientUpdate({module: (t(b), t(a))}, weight)


def merge(name, updates, previous=None, export_rank=0, **options):
    return get_method(name, **options).merge(updates, previous or {}, export_rank=export_rank)


# ---------------------------------------------------------------- registry and inputs


def mixed_updates(ranks=(2, 3), d=5, k=4):
    """Random updates of two modules at the given ranks (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return [ClientUpdate({m: (torch.randn(d, r, generator=gen), torch.randn(r, k, generator=gen))
                          for m in ("q", "v")}, float(i + 1)) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("name", strategies_for())
def test_each_method_merges_as_its_properties_say(name):
    """The properties the round loop reads are what the merge does, on random updates."""
    method = get_method(name)
    ranks = (2, 3) if method.heterogeneous else (3, 3)
    previous = {m: (torch.zeros(5, 3), torch.randn(3, 4)) for m in ("q", "v")}
    updates = mixed_updates(ranks)
    if method.shares == "B":  # A is frozen and shared: clients hold its first rows
        updates = [ClientUpdate({m: (b, previous[m][1][: b.shape[1]])
                                 for m, (b, _) in u.factors.items()}, u.weight) for u in updates]
    result = method.merge(updates, previous, export_rank=3)
    assert (result.global_factors == {}) == method.fresh_adapter
    assert bool(result.residual) == method.uses_residual
    if method.exactness_defined:
        error, _ = exactness(result.applied, updates)
        assert (error < 1e-6) == method.exact, error
    if method.shares == "A":  # the global B is the previous one, untouched
        assert all(torch.equal(result.global_factors[m][0], previous[m][0]) for m in previous)
    if not method.heterogeneous:
        with pytest.raises(ValueError, match="needs equal ranks"):
            method.merge(mixed_updates((2, 3)), previous, export_rank=3)


def test_unknown_method_names_the_known_ones_and_the_closest():
    from fedlora.config import SettingsError

    assert type(get_method("flexlora")) is METHODS["flexlora"]
    with pytest.raises(SettingsError, match="fedavg, fedex-lora, fedprox, fedsa-lora.*"
                                            "did you mean 'fedavg'"):
        get_method("fedavgg")


def test_options_are_validated_and_per_instance():
    from fedlora.config import SettingsError

    assert get_method("hetlora", weighting="examples").options.weighting == "examples"
    assert get_method("hetlora").options.weighting == "norm"
    with pytest.raises(SettingsError, match="setting 'hetlora-weighting': expected one of"):
        get_method("hetlora", weighting="size")
    with pytest.raises(SettingsError, match="strategy 'fedavg' has options none"):
        get_method("fedavg", weighting="norm")


def test_non_positive_weight_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="weight must be > 0"):
        update([[1.0]], [[1.0]], 0)
    with pytest.raises(ValueError, match=r"expected B \(d x r\) and A \(r x k\)"):
        ClientUpdate({"m": (torch.zeros(4, 2), torch.zeros(3, 5))}, 1)
    assert ClientUpdate({"m": (torch.zeros(4, 2), torch.zeros(2, 5))}, 1).rank == 2


def test_different_modules_and_layer_shapes_are_refused():
    u1 = ClientUpdate({"m": (torch.zeros(2, 1), torch.zeros(1, 2))}, 1)
    with pytest.raises(ValueError, match="other modules"):
        merge("fedavg", [u1, ClientUpdate({"n": (torch.zeros(2, 1), torch.zeros(1, 2))}, 1)])
    with pytest.raises(ValueError, match="3 x 2 layer, client 0 a 2 x 2"):
        merge("flora", [u1, ClientUpdate({"m": (torch.zeros(3, 1), torch.zeros(1, 2))}, 1)])
    with pytest.raises(ValueError, match="at least one client update"):
        merge("fedavg", [])


# ---------------------------------------------------------------- fedavg / fedprox


def test_fedavg_weights_one_and_two_give_a_plus_2b_over_3():
    result = merge("fedavg", [update([[3.0]], [[6.0, 0.0]], 1), update([[0.0]], [[0.0, 3.0]], 2)])
    b, a = result.global_factors["m"]
    assert torch.allclose(b, t([[1.0]]))  # (3 + 2*0) / 3
    assert torch.allclose(a, t([[2.0, 2.0]]))  # ((6 + 2*0) / 3, (0 + 2*3) / 3)
    assert b.dtype == torch.float32 and result.residual == {}
    assert result.info["weights"] == pytest.approx([1 / 3, 2 / 3])


def test_fedprox_merges_like_fedavg():
    ups = [update([[1.0], [2.0]], [[3.0, 4.0]], 5), update([[0.0], [1.0]], [[1.0, 1.0]], 3)]
    for x, y in zip(merge("fedavg", ups).global_factors["m"],
                    merge("fedprox", ups).global_factors["m"]):
        assert torch.equal(x, y)


def test_fedavg_with_mixed_ranks_names_the_module_and_a_heterogeneous_strategy():
    u1 = ClientUpdate({"q_proj": (torch.zeros(4, 2), torch.zeros(2, 3))}, 1)
    u2 = ClientUpdate({"q_proj": (torch.zeros(4, 4), torch.zeros(4, 3))}, 1)
    with pytest.raises(ValueError, match="fedavg needs equal ranks: module q_proj has rank 4 on "
                                         "client 1 but rank 2 on client 0") as err:
        merge("fedavg", [u1, u2])
    assert "rank-heterogeneous strategy" in str(err.value) and "flexlora" in str(err.value)


def test_fedavg_is_not_the_average_of_products():
    u1, u2 = update([[1.0], [0.0]], [[1.0, 0.0]], 1), update([[0.0], [1.0]], [[0.0, 1.0]], 1)
    result = merge("fedavg", [u1, u2])
    b, a = result.global_factors["m"]
    assert torch.allclose(b @ a, torch.full((2, 2), 0.25))  # while the ideal is I / 2
    # ||0.25 ones - 0.5 I||_F = 0.5 and ||0.5 I||_F = sqrt(0.5): exactness = sqrt(0.5)
    overall, per_module = exactness(result.applied, [u1, u2])
    assert overall == pytest.approx(math.sqrt(0.5)) and per_module["m"] == pytest.approx(overall)


# ---------------------------------------------------------------- hetlora


HET = [update([[1.0], [0.0]], [[3.0, 4.0]], 100),  # B A = [[3, 4], [0, 0]]: norm 5
       update([[1.0, 0.0], [0.0, 1.0]], [[9.0, 0.0], [0.0, 12.0]], 1)]  # diag(9, 12): norm 15


def test_hetlora_weights_by_update_norm_and_zero_pads():
    result = merge("hetlora", HET)
    assert result.info["weights"]["m"] == pytest.approx([5 / 20, 15 / 20])  # examples ignored
    b, a = result.global_factors["m"]
    # B = 0.25 [[1, 0], [0, 0]] + 0.75 I;  A = 0.25 [[3, 4], [0, 0]] + 0.75 diag(9, 12)
    assert torch.allclose(b, t([[1.0, 0.0], [0.0, 0.75]]))
    assert torch.allclose(a, t([[7.5, 1.0], [0.0, 9.0]]))


def test_hetlora_examples_weighting_and_export_rank():
    result = merge("hetlora", HET, export_rank=3, weighting="examples")
    p1, p2 = 100 / 101, 1 / 101
    b, a = result.global_factors["m"]
    assert b.shape == (2, 3) and a.shape == (3, 2)  # padded to export_rank 3
    assert torch.allclose(b[:, :2], t([[1.0, 0.0], [0.0, p2]]))
    assert torch.allclose(a[:2], t([[3 * p1 + 9 * p2, 4 * p1], [0.0, 12 * p2]]))
    assert torch.count_nonzero(b[:, 2]) == 0 and torch.count_nonzero(a[2]) == 0


def test_hetlora_falls_back_to_example_weights_when_every_update_is_zero():
    zero = [update([[0.0]], [[1.0]], 1), update([[0.0]], [[4.0]], 3)]
    result = merge("hetlora", zero)
    assert result.info["weights"]["m"] == pytest.approx([0.25, 0.75])
    assert torch.allclose(result.global_factors["m"][1], t([[3.25]]))  # 0.25 * 1 + 0.75 * 4


def test_hetlora_payload_truncates_and_pads():
    strategy = get_method("hetlora")
    g = {"m": (t([[1.0, 0.0], [0.0, 0.75]]), t([[7.5, 1.0], [0.0, 9.0]]))}
    b1, a1 = strategy.payload(g, 1)["m"]
    assert torch.equal(b1, t([[1.0], [0.0]])) and torch.equal(a1, t([[7.5, 1.0]]))
    b3, a3 = strategy.payload(g, 3)["m"]
    assert b3.shape == (2, 3) and torch.equal(b3 @ a3, g["m"][0] @ g["m"][1])


# ---------------------------------------------------------------- ffa-lora, fedsa-lora


A_PREV = t([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])  # shared frozen A at global rank 3


def test_ffa_lora_pads_b_keeps_a_and_is_exact_with_mixed_ranks():
    u1 = ClientUpdate({"m": (t([[2.0], [4.0]]), A_PREV[:1])}, 1)  # rank 1
    u2 = ClientUpdate({"m": (t([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), A_PREV)}, 3)  # rank 3
    result = merge("ffa-lora", [u1, u2], previous={"m": (torch.zeros(2, 3), A_PREV)})
    b, a = result.global_factors["m"]
    assert torch.equal(a, A_PREV)
    # 0.25 pad(B_1) + 0.75 B_2
    assert torch.allclose(b, t([[0.5 + 0.75, 0.0, 0.75], [1.0, 1.5, 0.0]]))
    ideal = 0.25 * u1.factors["m"][0] @ A_PREV[:1] + 0.75 * u2.factors["m"][0] @ A_PREV
    assert torch.allclose(b @ a, ideal)
    assert exactness(result.applied, [u1, u2])[0] < 1e-7


def test_ffa_lora_refuses_a_client_rank_above_the_global_rank():
    u = ClientUpdate({"m": (torch.ones(2, 4), torch.ones(4, 2))}, 1)
    with pytest.raises(ValueError, match="client rank 4 above the global rank 3"):
        merge("ffa-lora", [u], previous={"m": (torch.zeros(2, 3), A_PREV)})


def test_fedsa_lora_keeps_the_previous_b_and_averages_a():
    b_prev = t([[0.5], [-1.0]])
    ups = [update([[9.0], [9.0]], [[1.0, 2.0]], 1), update([[7.0], [7.0]], [[4.0, 8.0]], 2)]
    result = merge("fedsa-lora", ups, previous={"m": (b_prev, t([[0.0, 0.0]]))})
    b, a = result.global_factors["m"]
    assert torch.equal(b, b_prev)
    assert torch.allclose(a, t([[3.0, 6.0]]))  # (1 + 2*4) / 3, (2 + 2*8) / 3


# ---------------------------------------------------------------- flora, fedex-lora, flexlora


def test_flora_stacks_into_the_residual_and_has_no_global_adapter():
    ups = [update([[1.0], [0.0]], [[2.0, 0.0]], 1),
           update([[0.0, 1.0], [1.0, 0.0]], [[0.0, 3.0], [3.0, 0.0]], 2)]
    result = merge("flora", ups)
    assert result.global_factors == {} and get_method("flora").payload({}, 4) == {}
    b, a = result.residual["m"]
    assert torch.equal(b, t([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))  # [B_1, B_2]
    assert torch.allclose(a, t([[2 / 3, 0.0], [0.0, 2.0], [2.0, 0.0]]))  # [A_1/3; 2 A_2/3]
    assert torch.allclose(b @ a, t([[2 / 3 + 2.0, 0.0], [0.0, 2.0]]))  # sum p_i B_i A_i
    assert torch.equal(result.applied["m"][0], b) and torch.equal(result.applied["m"][1], a)


def test_fedex_residual_makes_the_fedavg_adapter_exact():
    u1, u2 = update([[1.0], [0.0]], [[1.0, 0.0]], 1), update([[0.0], [1.0]], [[0.0, 1.0]], 1)
    result = merge("fedex-lora", [u1, u2])
    b, a = result.global_factors["m"]
    assert torch.allclose(b @ a, torch.full((2, 2), 0.25))  # the fedavg adapter
    rb, ra = result.residual["m"]
    assert rb.shape == (2, 3)  # (N + 1) r
    assert torch.allclose(rb @ ra, t([[0.25, -0.25], [-0.25, 0.25]]))  # I/2 - ones/4
    ab, aa = result.applied["m"]
    assert torch.allclose(ab @ aa, 0.5 * torch.eye(2))
    assert exactness(result.applied, [u1, u2])[0] < 1e-7


def test_flexlora_keeps_the_largest_singular_values():
    ups = [update([[2.0], [0.0]], [[1.0, 0.0]], 1), update([[0.0], [1.0]], [[0.0, 1.0]], 1)]
    # average = diag(1, 0.5): singular values 1 and 0.5
    full = merge("flexlora", ups, export_rank=2)
    assert full.info["singular_values"]["m"] == pytest.approx([1.0, 0.5])
    b, a = full.global_factors["m"]
    assert torch.allclose(b @ a, t([[1.0, 0.0], [0.0, 0.5]]), atol=1e-6)
    cut = merge("flexlora", ups, export_rank=1)
    b, a = cut.global_factors["m"]
    assert torch.allclose(b @ a, t([[1.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    assert cut.info["dropped"] == pytest.approx(0.5 / math.sqrt(1.25))
    assert exactness(cut.applied, ups)[0] == pytest.approx(0.5 / math.sqrt(1.25))


# ---------------------------------------------------------------- scaling and linalg


def test_lora_scale_and_moving_between_ranks():
    assert lora_scale(8, 16.0, False) == 2.0 and lora_scale(4, 16.0, True) == 8.0
    peft = {"m": (t([[1.0], [2.0]]), t([[3.0, 1.0]]))}  # rank 4 adapter, s = 16 / 4 = 4
    delta = to_delta(peft, lora_scale(4, 16.0, False))
    assert torch.equal(delta["m"][0], t([[4.0], [8.0]]))
    moved = from_delta(delta, lora_scale(8, 16.0, False))  # as a rank-8 adapter, s = 2
    assert torch.equal(moved["m"][0], t([[2.0], [4.0]]))  # 2 * (B' A) = 4 * (B A)


def test_small_linalg_helpers():
    assert product_norm(t([[3.0], [4.0]]), t([[1.0]])) == pytest.approx(5.0)
    assert difference_norm(t([[1.0]]), t([[3.0]]), t([[1.0]]), t([[1.0]])) == pytest.approx(2.0)
    b, a = stack([(t([[1.0]]), t([[2.0]])), (t([[3.0]]), t([[4.0]]))], [0.5, 2.0])
    assert torch.equal(b, t([[1.0, 3.0]])) and torch.equal(a, t([[1.0], [8.0]]))
    pb, pa = pad_rank(t([[1.0], [2.0]]), t([[3.0, 4.0]]), 3)
    assert pb.shape == (2, 3) and pa.shape == (3, 2) and torch.equal(pb @ pa, t([[3, 4], [6, 8]]))
    tb, ta = truncate_rank(pb, pa, 1)
    assert torch.equal(tb, t([[1.0], [2.0]])) and torch.equal(ta, t([[3.0, 4.0]]))


def test_a_product_norm_from_float32_grams_is_the_float64_one_and_falls_back_where_it_cancels():
    """hetlora's weight ||B A||_F from float32 Gram blocks: the dense float64 norm to 1e-6 on a
    7B-shaped layer; where the factors' terms cancel (a product 10^3 times smaller than its
    factors, as a hostile reply may send) or overflow float32, the float64 figure instead."""
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(4096, 16, generator=gen) * 1e-2, torch.randn(16, 11008, generator=gen)
    dense = float((b.double() @ a.double()).norm())
    assert gram_product_norm(b, a) == pytest.approx(dense, rel=1e-6)
    column, row = torch.randn(300, 1, generator=gen), torch.randn(1, 200, generator=gen)
    near_zero = (torch.cat([column, -column], 1) * 1e3,  # B A = 1e6 c (r - r'): small
                 torch.cat([row, row + 1e-3 * torch.randn(1, 200, generator=gen)]) * 1e3)
    want = float((near_zero[0].double() @ near_zero[1].double()).norm())
    assert gram_product_norm(*near_zero) == pytest.approx(want, rel=1e-6)
    float32_grams = float(((near_zero[0].T @ near_zero[0]).double()
                           * (near_zero[1] @ near_zero[1].T).double()).sum())
    assert abs(math.sqrt(max(float32_grams, 0.0)) - want) > 1e-3 * want  # what it avoids
    huge = (torch.full((8, 2), 3e30), torch.full((2, 8), 1e10))
    assert (huge[0].T @ huge[0]).isinf().all()  # float32 Gram blocks overflow
    want = float((huge[0].double() @ huge[1].double()).norm())
    assert gram_product_norm(*huge) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("step", [1e-1, 1e-4])
def test_the_change_norm_from_the_factor_changes_equals_the_dense_one(step):
    """float32 factors of a 300 x 200 layer at rank 6, moved by `step`: the difference form
    gives the float64 dense ||B A - B_ref A_ref||^2 to 1e-5 relative even when the change is
    10^4 times smaller than the product (the direct float32 form loses it to cancellation),
    ||dB||^2 + ||dA||^2 and ||B A||^2 to 1e-6, and exactly 0 for a reply that did not move."""
    gen = torch.Generator().manual_seed(0)
    b_ref, a_ref = torch.randn(300, 6, generator=gen), torch.randn(6, 200, generator=gen)
    b = b_ref + step * torch.randn(300, 6, generator=gen)
    a = a_ref + step * torch.randn(6, 200, generator=gen)
    b64, a64, b_ref64, a_ref64 = (t.double() for t in (b, a, b_ref, a_ref))
    dense = float((b64 @ a64 - b_ref64 @ a_ref64).square().sum())
    got = change_figures(b, a, b_ref, a_ref, product=True)
    assert got.change == pytest.approx(dense, rel=1e-5)
    moved = float((b64 - b_ref64).square().sum() + (a64 - a_ref64).square().sum())
    assert got.moved == pytest.approx(moved, rel=1e-6)
    assert got.product == pytest.approx(float((b64 @ a64).square().sum()), rel=1e-6)
    assert change_figures(b, a, b_ref, a_ref, reference_grams(b_ref, a_ref), True) == got
    assert change_figures(b, a, b_ref, a_ref).product is None  # not asked for
    direct = difference_norm(b, a, b_ref, a_ref) ** 2  # the same inputs, float32 Gram blocks
    if step < 1e-3:
        assert abs(direct - dense) > 100 * abs(got.change - dense)
    assert change_figures(b_ref, a_ref, b_ref, a_ref, product=True)[:2] == (0.0, 0.0)


def test_the_change_norm_where_a_cancels_its_reference_uses_the_direct_blocks():
    """A reply whose A nearly cancels the A it received (A = 1e-4 x noise, A_ref of norm 1,
    B_ref = 0 as LoRA starts): A A^T derived from A_ref's Gram and the changes would lose it
    (float32 rounding of |A_ref|^2 against |A|^2 = 1e-8 of it); the figures take A A^T
    directly there and give the dense float64 ||B A||^2, as the change and as the product."""
    gen = torch.Generator().manual_seed(3)
    a_ref = torch.randn(6, 200, generator=gen) / 200 ** 0.5
    b_ref = torch.zeros(300, 6)
    b = torch.randn(300, 6, generator=gen)
    a = 1e-4 * torch.randn(6, 200, generator=gen) / 200 ** 0.5
    want = float((b.double() @ a.double()).square().sum())
    got = change_figures(b, a, b_ref, a_ref, product=True)
    assert got.change == pytest.approx(want, rel=1e-5)
    assert got.product == pytest.approx(want, rel=1e-5)
    da = a - a_ref  # what the derived form would have given
    gram_a, z, d = (a_ref @ a_ref.T).double(), (a_ref @ da.T).double(), (da @ da.T).double()
    derived = float(((b.T @ b).double() * (gram_a + z + z.T + d)).sum())
    assert abs(derived - want) > 1e-3 * want


def test_all_finite_is_isfinite_all_also_where_the_sum_overflows():
    from fedlora.validation import all_finite

    big = torch.full((4,), 3e38)  # finite entries whose sum overflows
    cases = [torch.ones(5), big, torch.tensor([1.0, math.inf]), torch.tensor([math.nan, 1.0]),
             torch.tensor([math.inf, -math.inf]), torch.tensor([-math.inf])]
    assert [all_finite(c) for c in cases] == [bool(torch.isfinite(c).all()) for c in cases] \
        == [True, True, False, False, False, False]


def test_truncate_svd_pads_when_the_product_has_fewer_singular_values():
    b_r, a_r, dropped = truncate_svd(t([[3.0], [4.0]]).double(), t([[1.0, 0.0]]).double(), 3)
    assert b_r.shape == (2, 3) and a_r.shape == (3, 2) and dropped == 0.0
    assert torch.allclose(b_r @ a_r, torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- exactness, truncation, compress


def test_zero_updates_count_as_exact():
    ups = [update([[0.0]], [[1.0]], 1)]
    assert exactness({"m": (t([[0.0]]), t([[0.0]]))}, ups) == (0.0, {"m": 0.0})
    assert exactness({"m": (t([[1.0]]), t([[1.0]]))}, ups)[0] == math.inf


def test_truncation_loss_of_a_diagonal_global():
    g = {"m": (torch.eye(2), t([[4.0, 0.0], [0.0, 3.0]]))}  # a client of rank 1 keeps the 4
    assert truncation_loss(g, get_method("hetlora").payload(g, 1)) == pytest.approx(3 / 5)
    assert truncation_loss(g, get_method("hetlora").payload(g, 2)) == 0.0


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_truncation_losses_of_all_ranks_at_once_equal_the_dense_oracle(strategy):
    """One pass for every client rank (the global factors' Grams made once) gives each
    rank's relative ||B A - P_B P_A|| / ||B A|| of the dense products."""
    from fedlora.aggregation.exactness import leading, truncation_losses

    gen = torch.Generator().manual_seed(3)
    g = {f"m{i}": (torch.randn(20 + i, 6, generator=gen), torch.randn(6, 14, generator=gen))
         for i in range(3)}
    method = get_method(strategy)
    payloads = {r: method.payload(g, r) for r in (1, 3, 6)}
    losses = truncation_losses(g, payloads)
    for r, payload in payloads.items():
        lost = sum(float((b.double() @ a.double() - payload[m][0].double()
                          @ payload[m][1].double()).square().sum()) for m, (b, a) in g.items())
        total = sum(float((b.double() @ a.double()).square().sum()) for b, a in g.values())
        assert losses[r] == pytest.approx(math.sqrt(lost / total), rel=1e-9, abs=1e-7)
        assert losses[r] == truncation_loss(g, payload)
    assert losses[1] > losses[3] > 0
    assert all(leading(*payloads[r][m], *g[m]) for r in payloads for m in g)  # the Gram path
    copied = {r: {m: (b.clone(), a.clone()) for m, (b, a) in p.items()}
              for r, p in payloads.items()}  # not views: the general Gram blocks
    assert truncation_losses(g, copied) == pytest.approx(losses, rel=1e-9, abs=1e-7)


def test_compress_drops_the_smallest_direction_and_leaves_small_modules_alone():
    small = (t([[1.0], [0.0]]), t([[2.0, 0.0]]))
    out, dropped = compress({"big": (torch.eye(2), t([[3.0, 0.0], [0.0, 4.0]])), "small": small}, 1)
    assert out["big"][0].shape == (2, 1) and out["small"][0] is small[0]
    assert torch.allclose(out["big"][0] @ out["big"][1], t([[0.0, 0.0], [0.0, 4.0]]), atol=1e-6)
    assert dropped == pytest.approx(3 / math.sqrt(25 + 4))  # 3 of ||(diag(3, 4), 2)||


# ---------------------------------------------------------------- server optimisers


def scalar(x):
    return {"m": (t([[x]]), t([[x]]))}


def test_server_optimizer_registry_and_common_keywords():
    from fedlora import config

    assert sorted(SERVER_OPTIMIZERS) == ["fedadagrad", "fedadam", "fedavgm", "fedyogi", "none"]
    # the torch-free names that validate `server-optimizer` are the registry's
    assert config.SERVER_OPTIMIZERS == tuple(sorted(SERVER_OPTIMIZERS))
    for cls in SERVER_OPTIMIZERS.values():
        cls(lr=0.5, momentum=0.9, beta2=0.99, tau=1e-3)  # the server passes all four


def test_fedavgm_with_lr_1_and_no_momentum_is_the_plain_merge():
    torch.manual_seed(0)
    opt = SERVER_OPTIMIZERS["fedavgm"](lr=1.0, momentum=0.0)
    previous = {"m": (torch.randn(5, 3), torch.randn(3, 4))}
    for _ in range(3):
        merged = {"m": (torch.randn(5, 3), torch.randn(3, 4))}
        out = opt.step(previous, merged)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(out["m"], merged["m"]))
        previous = out


def test_fedavgm_momentum_by_hand():
    opt = SERVER_OPTIMIZERS["fedavgm"]()  # lr 1, momentum 0.9
    x1 = opt.step(scalar(0.0), scalar(1.0))  # v = 1, x = 1
    x2 = opt.step(x1, scalar(1.5))  # delta 0.5, v = 0.9 * 1 + 0.5 = 1.4, x = 1 + 1.4
    assert x1["m"][0].item() == pytest.approx(1.0) and x2["m"][0].item() == pytest.approx(2.4)


def test_adaptive_optimisers_first_step_by_hand():
    # delta = 0.5: m = 0.1 * 0.5 = 0.05; adam/yogi v = 0.01 * 0.25 = 0.0025 (sqrt 0.05)
    expected = {"fedadam": 1 + 0.1 * 0.05 / (0.05 + 1e-3),
                "fedyogi": 1 + 0.01 * 0.05 / (0.05 + 1e-3),
                "fedadagrad": 1 + 0.1 * 0.5 / (0.5 + 1e-3)}  # momentum 0: m = 0.5, v = 0.25
    for name, value in expected.items():
        out = SERVER_OPTIMIZERS[name]().step(scalar(1.0), scalar(1.5))
        assert out["m"][0].item() == pytest.approx(value, rel=1e-6), name


def test_fedadam_second_step_and_state_round_trip():
    opt = SERVER_OPTIMIZERS["fedadam"]()
    x1 = opt.step(scalar(1.0), scalar(1.5))
    saved = opt.state_dict()
    x2 = opt.step(x1, {"m": (x1["m"][0] - 0.2, x1["m"][1] - 0.2)})  # delta = -0.2
    m = 0.9 * 0.05 + 0.1 * -0.2
    v = 0.99 * 0.0025 + 0.01 * 0.04
    assert x2["m"][0].item() == pytest.approx(x1["m"][0].item() + 0.1 * m / (math.sqrt(v) + 1e-3),
                                              rel=1e-6)
    resumed = SERVER_OPTIMIZERS["fedadam"]()
    resumed.load_state_dict(saved)
    again = resumed.step(x1, {"m": (x1["m"][0] - 0.2, x1["m"][1] - 0.2)})
    assert torch.equal(again["m"][0], x2["m"][0])
    assert sorted(saved) == ["m/m/A", "m/m/B", "v/m/A", "v/m/B"]


def test_server_optimizer_refuses_a_rank_change():
    with pytest.raises(ValueError, match="global rank must stay fixed"):
        SERVER_OPTIMIZERS["fedadam"]().step(scalar(1.0),
                                            {"m": (torch.ones(1, 2), torch.ones(2, 1))})


def test_hetlora_self_pruning_drops_weak_trailing_components():
    from fedlora.methods.hetlora import pruned_rank

    # components contribute 4, 2, 1 and 0.01 (||b_k|| * ||a_k||, summed over modules)
    b = torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.1]))
    a = torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.1]))
    factors = {"m": (b, a)}
    assert pruned_rank(factors, 0.0) == 4  # off
    assert pruned_rank(factors, 0.1) == 3  # 0.01 < 0.1 * mean(4, 2, 1); 1 >= 0.1 * 3
    assert pruned_rank(factors, 0.5) == 2  # then 1 < 0.5 * mean(4, 2) = 1.5; 2 >= 0.5 * 4
    assert pruned_rank(factors, 10.0) == 1  # never below one component
