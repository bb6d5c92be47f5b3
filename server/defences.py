"""What a reply meets between its validation and the merge, as pure functions (no Flower).

In the order a round applies them: the update-norm screen (`screen_norms`: max-update-ratio),
the weight cap (`weigh`: max-weight-ratio, client-weights), Krum (`krum`: robust=krum), then,
inside `GlobalAdapter.update`, clipping (`clip`: clip-norm) before the merge and the DP noise
(`noised`: dp-noise-multiplier) after it. The median and the trimmed mean replace the merge
itself (`Robust.replaces_merge`). Each screen returns which replies it kept and why it set the
others aside; the round loop (`server/rounds.py`) records and logs that. The math is in
`fedlora.aggregation.robust` and `fedlora.aggregation.privacy`; docs/robustness.md says what
each defence holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedlora.aggregation import ClientUpdate, Factors
from fedlora.aggregation.base import Dense
from fedlora.aggregation.privacy import add_dense_noise, add_noise, clip_all, noise_std
from fedlora.aggregation.robust import (
    cap_shares,
    cap_weights,
    dense_squared_distances,
    krum_scores,
    krum_select,
    lower_median,
    outliers,
    squared_distances,
)
from fedlora.validation import all_finite
from fedlora.wire import M


@dataclass(frozen=True)
class Robust:
    """The robust merge (robust, robust-f): the one setting the loop and the adapter read."""

    rule: str = "none"  # none, median, trimmed-mean (replace the merge) or krum (picks replies)
    f: int = 1  # hostile clients tolerated (trimmed-mean drops this many at each end)

    @property
    def krum(self) -> bool:
        """Whether Krum picks the replies the method merges."""
        return self.rule == "krum"

    @property
    def replaces_merge(self) -> bool:
        """Whether the coordinate-wise median or trimmed mean replaces the method's merge."""
        return self.rule in ("median", "trimmed-mean")


@dataclass(frozen=True)
class Screened:
    """What a screen kept (indices, in order) and why it set each other reply aside."""

    kept: tuple[int, ...]
    dropped: tuple[tuple[int, str], ...] = ()  # (index, reason), in index order
    figures: dict[str, Any] = field(default_factory=dict)  # the round's, for its metrics line
    scores: tuple[float, ...] = ()  # what each reply was judged by (krum: its score)


@dataclass(frozen=True)
class Weighed:
    """The weights the merge uses, the claims cut (index, reason) and the round's figures."""

    weights: tuple[float, ...]
    cut: tuple[tuple[int, str], ...]
    figures: dict[str, Any]


def finite(value: float) -> float | None:
    """`value`, or None when it is infinite (no bound: null in the metrics line)."""
    return value if math.isfinite(value) else None


class MergeFailed(ArithmeticError):
    """A merge whose result cannot become the global adapter (not finite); nothing changed."""


def first_non_finite(factors: Factors, dense: Dense) -> tuple[str, str] | None:
    """(module or wire key, "B", "A" or "") of the first tensor with an inf or NaN, or None."""
    for module, (b, a) in factors.items():
        for part, tensor in (("B", b), ("A", a)):
            if not all_finite(tensor):
                return module, part
    return next(((key, "") for key, v in dense.items() if not all_finite(v)),
                None)


def merge_problem(merged: Factors, dense: Dense) -> str | None:
    """Why a merge's result cannot become the global adapter (a tensor not finite), or None."""
    bad = first_non_finite(merged, dense)
    if bad is None:
        return None
    name, part = bad
    return (f"the merged factors of {name} are not finite" if part else
            f"the merged tensor {name} is not finite")


NOOP_RTOL = 1e-6  # an update this small relative to the adapter received is a no-op reply


def screen_updates(norms: Sequence[float], factor_norms: Sequence[float], ratio: float,
                   still: float = 0.0, factor_still: float = 0.0,
                   group_norms: Sequence[Mapping[str, float]] = ()) -> Screened:
    """`screen_norms` on the delta-W change and on the factors' own change, together: a reply
    far out on either is dropped. The factor screen holds where a merge averages B and A
    apart (fedavg, hetlora): A = 1e30 with B = 0 moves delta W by nothing, and the mean of
    the A's by 2e29. `group_norms` (lora-moe: each reply's change per expert it trained,
    `screen_groups`) drops a reply far out on any one group as well."""
    product = screen_norms(norms, ratio, still)
    factors = screen_norms(factor_norms, ratio, factor_still, "factor change")
    reasons = dict(product.dropped)
    for i, reason in (*factors.dropped, *screen_groups(group_norms, ratio, factor_still)):
        reasons.setdefault(i, reason)
    return Screened(tuple(i for i in range(len(norms)) if i not in reasons),
                    tuple(sorted(reasons.items())),
                    {**product.figures,
                     M.FACTOR_NORM_MEDIAN: factors.figures[M.UPDATE_NORM_MEDIAN]})


def screen_groups(group_norms: Sequence[Mapping[str, float]], ratio: float,
                  still: float = 0.0) -> list[tuple[int, str]]:
    """`screen_norms` group by group (lora-moe: each routed expert; the routers and shared
    experts), each over the replies that trained that group only: a client that trains one
    expert is measured against that expert's other trainers, not against the whole adapter's
    change, where one expert moved 9 times as far as the others' would still pass.
    Returns (index, reason) of every reply far out on some group (its first such group)."""
    dropped: dict[int, str] = {}
    for group in sorted({g for norms in group_norms for g in norms}):
        trainers = [i for i, norms in enumerate(group_norms) if group in norms]
        screened = screen_norms([group_norms[i][group] for i in trainers], ratio, still,
                                f"{group} change")
        for j, reason in screened.dropped:
            dropped.setdefault(trainers[j], reason)
    return sorted(dropped.items())


def screen_norms(norms: Sequence[float], ratio: float, still: float = 0.0,
                 what: str = "update norm") -> Screened:
    """Drop an update whose norm is above `ratio` x the round's lower median (max-update-ratio;
    0 = off), or not finite: nothing then scales the merge by a huge update. The median is
    taken over the finite norms above `still` (replies that returned what they received, to
    rounding, set no scale)."""
    moved = [n for n in norms if math.isfinite(n) and n > still]
    median = lower_median(moved) if moved else 0.0
    bound, far = outliers(norms, ratio, still)
    dropped = tuple((i, f"{what} {norms[i]:.4g} is not finite" if not math.isfinite(
        norms[i]) else f"{what} {norms[i]:.4g} is {norms[i] / median:.3g} times the "
                       f"round's lower median {median:.4g} (max-update-ratio={ratio:g})")
                    for i in far)
    return Screened(tuple(i for i in range(len(norms)) if i not in far), dropped,
                    {M.UPDATE_NORM_MEDIAN: median, M.UPDATE_NORM_BOUND: finite(bound)})


def not_finite(update: ClientUpdate) -> str | None:
    """Why an update cannot be merged at the merge's own scale (a factor or plain tensor
    with an inf or NaN once the LoRA scale is folded in: a B near float32's largest value
    overflows there), or None."""
    bad = first_non_finite(update.factors, update.dense)
    if bad is None:
        return None
    name = " ".join(filter(None, bad))
    return (f"{name} is not finite at the merge's scale (B x the LoRA scale overflows "
            f"float32 beyond about 3.4e38); the reply is not merged")


def weigh(claimed: Sequence[float], ratio: float, equal: bool, max_share: float = 1.0
          ) -> Weighed:
    """Each reply's merge weight: 1 with client-weights=equal, else its claim cut to `ratio` x
    the round's lower median claim (max-weight-ratio; 0 = off); then no reply's share of the
    round's total above max-share (the excess to the others by weight; 1 = off)."""
    if equal:  # nothing to cut: every reply weighs 1
        weights, cap = [1.0] * len(claimed), math.inf
    else:
        weights, cap = cap_weights(claimed, ratio)
    capped = cap_shares(weights, max_share)
    cut = [(i, f"num-examples {c:g} cut to {w:g}, max-weight-ratio={ratio:g} times the "
               f"round's lower median") for i, (c, w) in enumerate(zip(claimed, weights))
           if w < c and math.isfinite(cap)]
    total = sum(capped)
    cut += [(i, f"share of the merge {w / total:.3g} cut to {v / total:.3g} "
                f"(max-share={max_share:g})") for i, (w, v) in enumerate(zip(weights, capped))
            if v < w * (1 - 1e-12)]
    return Weighed(tuple(capped), tuple(sorted(cut)), {M.WEIGHT_CAP: finite(cap)})


def krum(updates: Sequence[ClientUpdate], f: int) -> Screened:
    """Multi-Krum: keep the n - f updates whose delta W is nearest the others'; the rest are
    dropped with their scores."""
    distances = (squared_distances([u.factors for u in updates])
                 + dense_squared_distances([u.dense for u in updates]))
    scores = krum_scores(distances, f)
    kept = tuple(krum_select(scores, f))
    cut = max(scores[i] for i in kept)
    dropped = tuple((i, f"not merged: krum score {score:.4g} (summed squared distance of its "
                        f"delta W to its nearest others) is above the {len(kept)} kept, the "
                        f"highest of which is {cut:.4g} (robust-f={f})")
                    for i, score in enumerate(scores) if i not in kept)
    return Screened(kept, dropped, scores=tuple(scores))


def clip(updates: Sequence[ClientUpdate], received: Sequence[Factors], dense: Dense,
         clip_norm: float, equal: bool) -> tuple[list[ClientUpdate], dict[str, Any]]:
    """Each update clipped to `clip_norm` around what its client received (`received[i]` and
    the plain tensors `dense`); weight 1 each when `equal` (DP: the Gaussian mechanism bounds
    each client, not each example). Returns the updates and the round's clipping figures."""
    out, norms = [], []
    for u, reference in zip(updates, received):  # replace keeps lora-moe's experts
        factors, plain, norm, _ = clip_all(u.factors, u.dense, reference, dense, clip_norm)
        out.append(replace(u, factors=factors, dense=plain, weight=1.0 if equal else u.weight,
                           norms=None))  # the clipped factors' norms are not the reply's
        norms.append(norm)
    return out, {M.CLIP_NORM: clip_norm, M.UPDATE_NORMS: norms,
                 M.CLIENTS_CLIPPED: sum(n > clip_norm for n in norms)}


def noised(merged: Factors, dense: Dense, shares: str, clients: int,
           contributors: Mapping[str, int], clip_norm: float, noise_multiplier: float,
           seed: int) -> tuple[Factors, Dense, float]:
    """The merged factors and plain tensors plus Gaussian noise of std z C / m, m the clients
    merged into each (`clients` for the shared factors, `contributors[key]` for a plain
    tensor), drawn from `seed`. Returns them and the std of a tensor all clients made."""
    std = noise_std(noise_multiplier, clip_norm, clients)
    stds = {k: noise_std(noise_multiplier, clip_norm, contributors[k]) for k in dense}
    generator = torch.Generator().manual_seed(seed)
    return (add_noise(merged, std, shares, generator),
            add_dense_noise(dense, stds, generator), std)

