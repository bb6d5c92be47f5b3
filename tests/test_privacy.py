"""Update clipping and client-level DP: the pure math (fedlora.aggregation.privacy) and the
privacy ledger (server.privacy) against independent bounds of the Gaussian mechanism."""

import math

import pytest
import torch

from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.privacy import (
    add_noise,
    clip_to_received,
    clip_update,
    factor_distance,
    noise_std,
)
from server.privacy import PrivacyLedger


def factors(seed: int, modules=("q", "v"), rank=4, out=6, inp=5):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g))
            for m in modules}


def test_factor_distance_is_the_l2_norm_of_all_entries_of_the_difference():
    x, ref = factors(1), factors(2)
    flat = torch.cat([(t - r).flatten() for m in x for t, r in zip(x[m], ref[m])])
    assert factor_distance(x, ref) == pytest.approx(float(flat.norm()), rel=1e-6)
    assert factor_distance(ref, ref) == 0.0


def test_clip_update_scales_the_update_to_the_bound_and_keeps_its_direction():
    x, ref = factors(1), factors(2)
    norm = factor_distance(x, ref)
    clipped, before, scale = clip_update(x, ref, norm / 4)
    assert before == pytest.approx(norm)
    assert scale == pytest.approx(0.25)
    assert factor_distance(clipped, ref) == pytest.approx(norm / 4, rel=1e-6)
    for m in x:  # same direction: clipped - ref == 0.25 (x - ref)
        for c, t, r in zip(clipped[m], x[m], ref[m]):
            torch.testing.assert_close(c - r, 0.25 * (t - r), rtol=1e-5, atol=1e-6)


def test_an_update_within_the_bound_is_returned_unchanged():
    x, ref = factors(1), factors(2)
    clipped, _, scale = clip_update(x, ref, factor_distance(x, ref) * 2)
    assert scale == 1.0 and clipped is x
    with pytest.raises(ValueError, match="clip norm must be > 0"):
        clip_update(x, ref, 0.0)


@pytest.mark.parametrize("shares", ["both", "B", "A"])
def test_client_clipping_counts_only_the_factors_it_sends(shares):
    trained, received = factors(1), factors(2)
    clipped, norm, _ = clip_to_received(trained, received, shares, 0.5)
    index = {"B": [0], "A": [1], "both": [0, 1]}[shares]
    expected = math.sqrt(sum(float((trained[m][i] - received[m][i]).square().sum())
                             for m in trained for i in index))
    assert norm == pytest.approx(expected, rel=1e-6)
    assert factor_distance(clipped, received) == pytest.approx(0.5, rel=1e-6)
    for m in trained:  # a factor not sent is the received one
        for i in {0, 1} - set(index):
            assert torch.equal(clipped[m][i], received[m][i])


def test_noise_std_is_multiplier_times_clip_over_clients():
    assert noise_std(1.2, 0.5, 4) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        noise_std(1.0, 1.0, 0)


@pytest.mark.parametrize("shares", ["both", "B", "A"])
def test_noise_touches_only_shared_factors_and_is_seeded(shares):
    base = {m: (torch.zeros(64, 8), torch.zeros(8, 64)) for m in ("q", "v")}
    one = add_noise(base, 0.3, shares, torch.Generator().manual_seed(7))
    two = add_noise(base, 0.3, shares, torch.Generator().manual_seed(7))
    noised = {"both": (0, 1), "B": (0,), "A": (1,)}[shares]
    for m in base:
        for i in (0, 1):
            assert torch.equal(one[m][i], two[m][i])  # same seed, same noise
            if i in noised:
                assert float(one[m][i].std()) == pytest.approx(0.3, rel=0.1)
            else:
                assert torch.equal(one[m][i], base[m][i])


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release of sensitivity 1 and noise std sigma
    (Balle & Wang 2018, Theorem 8), by bisection: a lower bound for any accountant."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    delta_of = lambda e: (phi(-e * sigma + 1 / (2 * sigma))
                          - math.exp(e) * phi(-e * sigma - 1 / (2 * sigma)))
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def rdp_epsilon(z: float, releases: int, delta: float) -> float:
    """The classic RDP bound (Mironov 2017): min over orders of k a / (2 z^2) + log(1/d)/(a-1)."""
    return min(releases * a / (2 * z * z) + math.log(1 / delta) / (a - 1)
               for a in (1 + i / 100 for i in range(1, 20000)))


@pytest.mark.parametrize("z, releases", [(1.0, 1), (1.0, 10), (2.0, 10), (0.7, 3)])
def test_ledger_epsilon_lies_between_the_exact_gaussian_value_and_the_classic_rdp_bound(
        z, releases):
    ledger = PrivacyLedger(z, 1e-5, population=10)
    assert ledger.epsilon() == 0.0  # nothing released yet
    ledger.record(releases)
    assert ledger.releases == releases
    # k Gaussian releases of multiplier z compose to one of multiplier z / sqrt(k)
    exact = gaussian_epsilon(z / math.sqrt(releases), 1e-5)
    assert exact <= ledger.epsilon() <= rdp_epsilon(z, releases, 1e-5)


def test_ledger_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = {}
    for z in (0.8, 1.6):
        ledger = PrivacyLedger(z, 1e-5, population=4)
        ledger.record(1)
        first = ledger.epsilon()
        ledger.record(4)
        eps[z] = ledger.epsilon()
        assert eps[z] > first
    assert eps[1.6] < eps[0.8]
    assert PrivacyLedger(1.0, 1e-5, 4).epsilon() == 0.0


def test_global_adapter_with_dp_clips_equal_weights_and_adds_seeded_noise():
    from fedlora.methods import get_method
    from server.global_adapter import GlobalAdapter

    start = factors(0)
    updates = [ClientUpdate(factors(i), weight) for i, weight in ((1, 10.0), (2, 1.0))]

    def adapter(**kw):
        return GlobalAdapter(method=get_method("fedavg"), lora=None, factors=dict(start),
                             global_rank=4, **kw)

    clipped = adapter(clip_norm=0.5)
    clipped.update(updates, server_round=1)
    private = [adapter(clip_norm=0.5, noise_multiplier=1.0, noise_seed=3) for _ in range(2)]
    info = [p.update(updates, server_round=1) for p in private]
    assert info[0]["clients-clipped"] == 2
    assert info[0]["dp-noise-std"] == pytest.approx(1.0 * 0.5 / 2)
    for m in start:  # seeded: both runs draw the same noise
        assert torch.equal(private[0].factors[m][0], private[1].factors[m][0])
    # without noise, equal weights: the mean of the two clipped updates
    mean_b = sum(clip_update(u.factors, start, 0.5)[0]["q"][0] for u in updates) / 2
    noiseless = adapter(clip_norm=0.5, noise_multiplier=1e-12, noise_seed=3)
    noiseless.update(updates, server_round=1)
    torch.testing.assert_close(noiseless.factors["q"][0], mean_b, rtol=1e-5, atol=1e-6)
    # server clipping alone keeps the example weights: closer to the 10x-weighted client
    weighted = (10 * clip_update(updates[0].factors, start, 0.5)[0]["q"][0]
                + clip_update(updates[1].factors, start, 0.5)[0]["q"][0]) / 11
    torch.testing.assert_close(clipped.factors["q"][0], weighted, rtol=1e-5, atol=1e-6)
