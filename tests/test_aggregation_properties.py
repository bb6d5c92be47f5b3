"""Property tests: factored merges against a dense oracle on small random shapes.

The dense d x k reference lives only here (and in benchmarks/merge_speed.py), never in fedlora.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.exactness import compress, exactness, truncation_loss
from fedlora.aggregation.linalg import (
    balanced_factors,
    balanced_svd,
    cholesky_qr2,
    factored_svd,
    pad_rank,
    stack,
    thin_qr,
)
from fedlora.config import lora_scale
from fedlora.factors import from_delta, to_delta
from fedlora.methods import get_method, strategies_for

FAST = settings(max_examples=40, deadline=None)
SEEDS = st.integers(0, 2**31 - 1)
DIMS = st.integers(1, 12)
RANKS = st.lists(st.integers(1, 5), min_size=1, max_size=4)  # one rank per client


def factors(gen, d, k, r):
    return torch.randn(d, r, generator=gen), torch.randn(r, k, generator=gen)


def clients(seed, d, k, ranks, modules=("m",), a_shared=None):
    """Random updates with integer weights in 1..10; A taken from `a_shared` when given."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randint(1, 11, (len(ranks),), generator=gen).tolist()
    ups = []
    for r, w in zip(ranks, weights):
        fs = {m: factors(gen, d, k, r) for m in modules}
        if a_shared is not None:
            fs = {m: (b, a_shared[m][:r]) for m, (b, _) in fs.items()}
        ups.append(ClientUpdate(fs, w))
    return ups


def oracle(updates, module="m"):
    """Dense sum_i p_i B_i A_i in float64."""
    total = sum(u.weight for u in updates)
    return sum((u.weight / total) * (u.factors[module][0].double() @ u.factors[module][1].double())
               for u in updates)


def product(pair):
    return pair[0].double() @ pair[1].double()


def rel(x, y):
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


# ---------------------------------------------------------------- exact strategies


@FAST
@given(SEEDS, DIMS, DIMS, RANKS)
def test_flora_equals_the_dense_oracle(seed, d, k, ranks):
    ups = clients(seed, d, k, ranks)
    result = get_method("flora").merge(ups, {}, export_rank=0)
    assert rel(product(result.applied["m"]), oracle(ups)) < 1e-5
    assert result.residual["m"][0].shape == (d, sum(ranks))


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.integers(0, 3))
def test_flexlora_without_truncation_equals_the_dense_oracle(seed, d, k, ranks, extra):
    ups = clients(seed, d, k, ranks)
    result = get_method("flexlora").merge(ups, {}, export_rank=sum(ranks) + extra)
    b, a = result.global_factors["m"]
    assert b.dtype == torch.float32 and b.shape == (d, sum(ranks) + extra)
    assert rel(b.double() @ a.double(), oracle(ups)) < 1e-5
    assert exactness(result.applied, ups)[0] < 1e-5


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.integers(0, 2))
def test_ffa_lora_is_exact_with_mixed_ranks(seed, d, k, ranks, extra):
    global_rank = max(ranks) + extra
    a_prev = {"m": torch.randn(global_rank, k, generator=torch.Generator().manual_seed(seed + 1))}
    ups = clients(seed, d, k, ranks, a_shared=a_prev)
    previous = {"m": (torch.zeros(d, global_rank), a_prev["m"])}
    result = get_method("ffa-lora").merge(ups, previous, export_rank=global_rank)
    assert torch.equal(result.global_factors["m"][1], a_prev["m"])
    assert rel(product(result.applied["m"]), oracle(ups)) < 1e-5
    assert exactness(result.applied, ups)[0] < 1e-5


@FAST
@given(SEEDS, DIMS, DIMS, st.integers(1, 5), st.integers(1, 4))
def test_fedex_lora_is_exact(seed, d, k, rank, n):
    ups = clients(seed, d, k, [rank] * n)
    result = get_method("fedex-lora").merge(ups, {}, export_rank=rank)
    assert rel(product(result.applied["m"]), oracle(ups)) < 1e-5
    adapter, residual = product(result.global_factors["m"]), product(result.residual["m"])
    assert rel(adapter + residual, oracle(ups)) < 1e-5
    assert result.residual["m"][0].shape == (d, (n + 1) * rank)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(SEEDS, st.integers(2, 12), st.integers(2, 12), st.integers(1, 5))
def test_fedavg_is_not_exact_when_clients_differ(seed, d, k, rank):
    ups = clients(seed, d, k, [rank, rank])
    result = get_method("fedavg").merge(ups, {}, export_rank=rank)
    overall, _ = exactness(result.applied, ups)
    assert overall > 1e-3
    assert abs(overall - rel(product(result.applied["m"]), oracle(ups))) < 1e-6 * max(1, overall)


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.data())
def test_every_exact_strategy_is_exact_and_returns_float32(seed, d, k, ranks, data):
    name = data.draw(st.sampled_from(strategies_for()))
    strategy = get_method(name)
    ranks = ranks if strategy.heterogeneous else [ranks[0]] * len(ranks)
    global_rank = max(ranks)
    a_prev = {"m": torch.randn(global_rank, k, generator=torch.Generator().manual_seed(seed))}
    ups = clients(seed, d, k, ranks, a_shared=a_prev if strategy.shares == "B" else None)
    previous = {"m": (torch.zeros(d, global_rank), a_prev["m"])}
    result = strategy.merge(ups, previous, export_rank=global_rank)
    for b, a in list(result.global_factors.values()) + list(result.residual.values()):
        assert b.dtype == a.dtype == torch.float32
    if strategy.exact:
        assert exactness(result.applied, ups)[0] < 1e-5
    for b, a in strategy.payload(result.global_factors, ranks[0]).values():
        assert b.shape == (d, ranks[0]) and a.shape == (ranks[0], k)


# ---------------------------------------------------------------- truncation (Eckart-Young)


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.data())
def test_flexlora_truncation_error_is_the_dropped_singular_values(seed, d, k, ranks, data):
    export_rank = data.draw(st.integers(1, sum(ranks)))
    ups = clients(seed, d, k, ranks)
    dense = oracle(ups)
    s = torch.linalg.svdvals(dense)
    expected = float(s[export_rank:].square().sum().sqrt())
    result = get_method("flexlora").merge(ups, {}, export_rank=export_rank)
    error = float(torch.linalg.norm(product(result.global_factors["m"]) - dense))
    norm = float(torch.linalg.norm(dense))
    assert abs(error - expected) <= 1e-5 * norm
    assert abs(result.info["dropped"] - expected / norm) <= 1e-5
    spectrum = torch.tensor(result.info["singular_values"]["m"], dtype=torch.float64)
    n = min(len(spectrum), len(s))
    assert torch.allclose(spectrum[:n], s[:n], atol=1e-5 * norm)


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.data())
def test_flexlora_payload_is_the_best_rank_r_approximation(seed, d, k, ranks, data):
    ups = clients(seed, d, k, ranks)
    strategy = get_method("flexlora")
    merged = strategy.merge(ups, {}, export_rank=sum(ranks)).global_factors
    r = data.draw(st.integers(1, sum(ranks)))
    dense = oracle(ups)
    s = torch.linalg.svdvals(dense)
    expected = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
    assert abs(truncation_loss(merged, strategy.payload(merged, r)) - expected) <= 1e-5


@FAST
@given(SEEDS, DIMS, DIMS, st.integers(1, 10), st.integers(1, 6))
def test_compress_keeps_the_budget_and_reports_the_dense_truncation_error(seed, d, k, r, budget):
    gen = torch.Generator().manual_seed(seed)
    residual = {"m": factors(gen, d, k, r), "n": factors(gen, k, d, r)}
    out, dropped = compress(residual, budget)
    lost = total = 0.0
    for module, pair in residual.items():
        dense = product(pair)
        s = torch.linalg.svdvals(dense)
        assert out[module][0].shape[1] == min(r, budget)
        error = float(torch.linalg.norm(product(out[module]) - dense))
        assert abs(error - float(s[budget:].square().sum().sqrt())) <= 1e-5 * float(s[0])
        lost, total = lost + float(s[budget:].square().sum()), total + float(s.square().sum())
    assert abs(dropped - math.sqrt(lost / total)) <= 1e-6


# ---------------------------------------------------------------- linalg and exactness


def conditioned(seed, n, c, cond, zero_columns=0):
    """An n x c float64 matrix with singular values from 1 down to 1/cond, some columns zero."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, c, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))[0]
    x = (u * torch.logspace(0, -math.log10(cond), c, dtype=torch.float64)) @ v.T
    x[:, :zero_columns] = 0
    return x


def qr_errors(x):
    q, r = thin_qr(x)
    eye = torch.eye(q.shape[1], dtype=x.dtype)
    return float((q.T @ q - eye).abs().max()), float((x - q @ r).norm() / x.norm())


def test_thin_qr_uses_cholesky_qr2_when_well_conditioned_and_is_as_accurate_as_householder():
    x = conditioned(0, 300, 40, 1e4)
    assert cholesky_qr2(x) is not None  # the fast path
    ortho, residual = qr_errors(x)
    q_h, r_h = torch.linalg.qr(x)
    ortho_h = float((q_h.T @ q_h - torch.eye(40, dtype=x.dtype)).abs().max())
    assert ortho <= max(4 * ortho_h, 1e-15) and residual <= 1e-15


def test_thin_qr_falls_back_to_householder_on_ill_conditioned_or_rank_deficient_input():
    for x in (conditioned(1, 300, 40, 1e12), conditioned(2, 300, 40, 10.0, zero_columns=3)):
        assert cholesky_qr2(x) is None  # the first pass shows CholeskyQR2 would not hold
        ortho, residual = qr_errors(x)
        assert ortho <= 1e-14 and residual <= 1e-15


def test_thin_qr_of_a_wide_matrix_is_householder():
    x = conditioned(3, 40, 40, 10.0)[:10]  # 10 x 40
    assert cholesky_qr2(x) is None
    q, r = thin_qr(x)
    assert q.shape == (10, 10) and torch.allclose(q @ r, x, atol=1e-14)


def test_factored_svd_keep_gives_the_leading_singular_vectors_of_the_full_one():
    gen = torch.Generator().manual_seed(4)
    b, a = (x.double() for x in factors(gen, 50, 60, 12))
    u, s, vh = factored_svd(b, a)
    uk, sk, vhk = factored_svd(b, a, keep=5)
    assert torch.equal(s, sk) and uk.shape == (50, 5) and vhk.shape == (5, 60)
    assert torch.allclose(uk * sk[:5] @ vhk, (u[:, :5] * s[:5]) @ vh[:5], atol=1e-12)


@FAST
@given(SEEDS, DIMS, DIMS, st.integers(1, 14), st.integers(1, 16))
def test_balanced_svd_equals_balanced_factors_of_the_factored_svd(seed, d, k, r, rank):
    b, a = (x.double() for x in factors(torch.Generator().manual_seed(seed), d, k, r))
    b_r, a_r, s = balanced_svd(b, a, rank, torch.float32)
    u, expected_s, vh = factored_svd(b, a)
    eb, ea = balanced_factors(u, expected_s, vh, rank)
    assert b_r.dtype == a_r.dtype == torch.float32 and b_r.shape == (d, rank)
    assert torch.equal(s, expected_s)
    scale = max(float(s[0]), 1e-30)
    assert torch.allclose(b_r.double() @ a_r.double(), eb @ ea, atol=1e-6 * scale)


def test_stack_converts_into_the_dtype_asked_for_and_weights_a():
    gen = torch.Generator().manual_seed(5)
    f1, f2 = factors(gen, 6, 7, 2), factors(gen, 6, 7, 3)
    b, a = stack([f1, f2], [0.25, 0.75], torch.float64)
    assert b.dtype == a.dtype == torch.float64 and b.shape == (6, 5) and a.shape == (5, 7)
    expected = 0.25 * f1[0].double() @ f1[1].double() + 0.75 * f2[0].double() @ f2[1].double()
    assert torch.allclose(b @ a, expected, atol=1e-12)


@FAST
@given(SEEDS, DIMS, DIMS, st.integers(1, 14))
def test_factored_svd_equals_the_dense_svd(seed, d, k, r):
    b, a = (x.double() for x in factors(torch.Generator().manual_seed(seed), d, k, r))
    u, s, vh = factored_svd(b, a)
    dense = torch.linalg.svdvals(b @ a)
    n = min(d, k, r)
    assert s.shape == (n,) and torch.all(s[:-1] >= s[1:])
    scale = float(dense[0])
    assert torch.allclose(s, dense[:n], atol=1e-10 * scale)
    assert torch.all(dense[n:] <= 1e-10 * scale)
    assert torch.allclose(u @ torch.diag(s) @ vh, b @ a, atol=1e-10 * scale)
    assert torch.allclose(u.T @ u, torch.eye(n, dtype=torch.float64), atol=1e-10)


@FAST
@given(SEEDS, DIMS, DIMS, RANKS, st.integers(1, 6))
def test_exactness_equals_the_dense_computation(seed, d, k, ranks, applied_rank):
    gen = torch.Generator().manual_seed(seed + 7)
    ups = clients(seed, d, k, ranks, modules=("m", "n"))
    applied = {m: factors(gen, d, k, applied_rank) for m in ("m", "n")}
    overall, per_module = exactness(applied, ups)
    nums = {m: float(torch.linalg.norm(product(applied[m]) - oracle(ups, m))) for m in applied}
    dens = {m: float(torch.linalg.norm(oracle(ups, m))) for m in applied}
    for m in applied:
        assert abs(per_module[m] - nums[m] / dens[m]) <= 1e-6 * max(1.0, nums[m] / dens[m])
    dense_overall = math.sqrt(sum(v**2 for v in nums.values()) / sum(v**2 for v in dens.values()))
    assert abs(overall - dense_overall) <= 1e-6 * max(1.0, dense_overall)


@FAST
@given(SEEDS, DIMS, DIMS, st.integers(1, 5), st.integers(0, 5), st.booleans(),
       st.floats(1.0, 64.0))
def test_moving_an_update_between_ranks_keeps_delta_w(seed, d, k, r, grow, rslora, alpha):
    b, a = factors(torch.Generator().manual_seed(seed), d, k, r)
    r_new = r + grow
    s_old, s_new = lora_scale(r, alpha, rslora), lora_scale(r_new, alpha, rslora)
    moved = from_delta(to_delta({"m": (b, a)}, s_old), s_new)
    b2, a2 = pad_rank(*moved["m"], r_new)
    assert b2.shape == (d, r_new)
    assert torch.allclose(s_new * b2.double() @ a2.double(), s_old * b.double() @ a.double(),
                          rtol=1e-5, atol=1e-5 * alpha)
