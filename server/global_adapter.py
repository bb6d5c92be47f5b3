"""The server's global adapter across rounds: merge, server optimiser, residual, payloads, export.

No Flower here: `server/rounds.py` turns messages into `ClientUpdate`s and calls `update()`,
which clips and adds the DP noise through `server/defences.py` around the merge.
Everything is kept in delta-W scale (the LoRA scale folded into B, so delta W = B @ A) and only
converted to PEFT's scale through `fedlora.factors` (`payload`, `to_update`,
`export`), with each adapter's own rank: moving an update between ranks never changes delta W.
The payload at a rank is built once per version of the global factors and reused for sending,
for filling the factors a reply does not carry, for clipping and for the truncation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import cast

import torch

from fedlora.adapters.lora_moe import expert_of
from fedlora.aggregation import ClientUpdate, Factors
from fedlora.aggregation.base import (
    Dense,
    LazyFactors,
    MergeResult,
    RunningSum,
    Watched,
    dense_distance,
    factor_shapes,
)
from fedlora.aggregation.exactness import (
    EXACT_BUDGET,
    SKETCH,
    estimated_exactness,
    exact_cost,
    exactness,
    sketch_product,
    sketch_sides,
    truncation_losses,
)
from fedlora.aggregation.linalg import (
    ChangeFigures,
    block_figures,
    change_blocks,
    change_figures,
    difference_norm,
    gram_product_norm,
    own_blocks,
    product_norm,
    reference_grams,
    squared_norm,
)
from fedlora.aggregation.privacy import factor_distance
from fedlora.aggregation.robust import change_norm, robust_merge, robust_shared_a
from fedlora.aggregation.server_opt import ServerOptimizer
from fedlora.config import LoraSettings
from fedlora.factors import dense_part, flatten, from_peft, to_peft, unflatten
from fedlora.methods import Method
from fedlora.seeds import derive_seed
from fedlora.wire import M
from server import defences
from server.defences import Robust


def concat(parts: list[Factors]) -> Factors:
    """Factors whose product is the sum of the parts' products (stacked along the rank), each
    module made when read (`LazyFactors`: a part may be a merge's large stack)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}

    def joined(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [p[module] for p in parts]
        return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs])

    return cast(Factors, LazyFactors(list(parts[0]), joined))


def short_name(module: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'layers.0.self_attn.q_proj'."""
    return module.removeprefix("base_model.model.").removeprefix("model.")


def rank_of(factors: Factors) -> int:
    """Rank of a set of factors (0 when empty); of a merge's stack without making a module."""
    if isinstance(factors, LazyFactors) and factors.rank is not None:
        return factors.rank
    return next(iter(factors.values()))[0].shape[1] if factors else 0


@dataclass
class GlobalAdapter:
    """Global factors, frozen residual and server-optimiser state of one run."""

    method: Method
    lora: LoraSettings  # alpha and rsLoRA of every client; the rank is per adapter
    factors: Factors  # the global adapter, delta-W scale, at the global rank
    global_rank: int  # clients train at ranks <= this; evaluation uses it (flora: fresh)
    optimizer: ServerOptimizer | None = None
    residual: Factors = field(default_factory=dict)
    # the plain tensors of a PEFT method without factors (IA3's vectors), wire keys, as they
    # are (no scale, no rank); {} for LoRA
    dense: Dense = field(default_factory=dict)
    clip_norm: float = 0.0  # clip each update to this norm (0 = off)
    noise_multiplier: float = 0.0  # client-level DP noise (needs clip_norm and a linear merge)
    noise_seed: int = 0  # the noise of round n is drawn from seed (noise_seed, n)
    robust: Robust = field(default_factory=Robust)  # median / trimmed-mean: here; krum: the loop
    # The payload at each rank, built once per version of `factors` (cleared when it changes)
    _received: dict[int, Factors] = field(default_factory=dict, repr=False)  # delta-W scale
    _peft: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _grams: dict[int, tuple[dict[str, int], torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("factors", "dense"):  # a new global adapter: payloads rebuilt on demand
            for cache in ("_received", "_peft", "_grams"):
                self.__dict__.setdefault(cache, {}).clear()
        super().__setattr__(name, value)

    @property
    def rank(self) -> int:
        """Rank of the global adapter (fixed for the run, also when flora keeps it empty)."""
        return self.global_rank

    def scale(self, rank: int) -> float:
        """LoRA scale of an adapter of this rank (alpha/r or alpha/sqrt(r))."""
        return self.lora.scale(rank)

    def start_from(self, factors: Factors) -> str:
        """Start the run from a trained adapter's factors (delta-W scale; init-adapter): as
        the global factors where the clients train the whole adapter at its rank, else as a
        frozen residual under a fresh adapter (ffa-lora's seeded A, fedsa-lora's private B,
        flora's fresh adapters, another rank). Either way every client's model starts at
        base + that adapter. Returns where it went ("factors" or "residual")."""
        whole = (self.method.shares == "both" and not self.method.fresh_adapter
                 and not self.method.personal)
        if whole and rank_of(factors) == self.global_rank:
            self.factors = {m: (b.float(), a.float()) for m, (b, a) in factors.items()}
            return "factors"
        self.residual = {m: (b.float(), a.float()) for m, (b, a) in factors.items()}
        return "residual"

    # ---- what goes to clients ----------------------------------------------------------------
    def received(self, rank: int) -> Factors:
        """What a rank-`rank` client receives (delta-W scale): the reference its update is
        measured and clipped around, and what the truncation loss compares with. Nothing
        where every client starts a fresh adapter (flora: B = 0, so its change is its B A),
        in the first round too, whatever the global factors were initialised to."""
        if self.method.fresh_adapter:
            return {}
        if rank not in self._received:
            self._received[rank] = self.method.payload(self.factors, rank)
        return self._received[rank]

    def received_grams(self, rank: int) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """(B_ref^T B_ref, A_ref A_ref^T) of every module a rank-`rank` client receives
        (float64, stacked: each (modules, r, r)) and each module's index in them, computed once
        per version of `factors`: each reply's `figures` reuses them."""
        if rank not in self._grams:
            received = self.received(rank)
            grams = [reference_grams(b, a) for b, a in received.values()]
            index = {m: i for i, m in enumerate(received)}
            empty = torch.zeros(0, rank, rank, dtype=torch.float64)
            self._grams[rank] = (index, torch.stack([g[0] for g in grams]) if grams else empty,
                                 torch.stack([g[1] for g in grams]) if grams else empty)
        return self._grams[rank]

    def payload(self, rank: int) -> dict[str, torch.Tensor]:
        """Global adapter for a client of `rank`, in PEFT's scale, wire keys (maybe empty)."""
        if rank not in self._peft:
            fresh = self.method.fresh_adapter or not self.factors
            factors = {} if fresh else to_peft(self.received(rank), self.scale(rank))
            self._peft[rank] = {**factors, **self.dense}
        return self._peft[rank]

    def residual_state(self) -> dict[str, torch.Tensor]:
        """The frozen residual (delta W = B @ A), wire keys; empty when there is none."""
        return flatten(self.residual)

    # ---- what comes back ----------------------------------------------------------------------
    def to_update(self, state: dict[str, torch.Tensor], rank: int, weight: float) -> ClientUpdate:
        """A client's reply (PEFT scale; ffa-lora sends only B, fedsa-lora only A) as a
        delta-W ClientUpdate; the factor it did not send is the one it received. Plain
        tensors (a PEFT method without factors) are taken as they are."""
        dense = {k: v.to(torch.float32) for k, v in dense_part(state).items()}
        factors = from_peft(state, self.scale(rank), fill=self.payload(rank))
        return ClientUpdate(factors, weight, dense)

    def moved(self, update: ClientUpdate) -> float:
        """How far a client moved from what it received: ||B A - B_ref A_ref||_F over the
        modules (||A - A_ref||_F when only A is merged) and ||T - T_ref|| over the plain
        tensors, together."""
        return math.hypot(change_norm(self.merged_part(update.factors),
                                      self.merged_part(self.received(update.rank))),
                          dense_distance(update.dense, self.dense))

    def figures(self, update: ClientUpdate) -> tuple[float, float, dict[str, float] | None]:
        """(`moved`, `distance`, norms) of an update, theirs to 1e-5, in one pass over its
        layers: each float32 layer's four change blocks (`change_blocks`; against zero
        factors where the client received none, as flora's fresh adapters: then the change is
        B A itself, `own_blocks`), combined for all layers at once (`block_figures`); float64
        where float32's range or mixed dtypes call for it. norms: ||B A||_F of each layer
        where the method weighs by it (`Method.weighs_by_norm`: hetlora), from the same
        blocks, for `ClientUpdate.norms`; else None."""
        if self.method.shares == "A":
            return self.moved(update), self.distance(update), None
        received = self.received(update.rank)
        index, gram_b, gram_a = self.received_grams(update.rank)
        wants = self.method.weighs_by_norm
        blocked = [m for m, (b, a) in update.factors.items() if
                   {b.dtype, a.dtype, *(t.dtype for t in received.get(m, ()))} == {torch.float32}]
        r = update.rank
        blocks = torch.empty(len(blocked), 4, r, r)
        ref_b, ref_a = (torch.zeros(len(blocked), r, r, dtype=torch.float64) for _ in range(2))
        for i, module in enumerate(blocked):
            if module in received:
                change_blocks(*update.factors[module], *received[module], out=blocks[i])
                ref_b[i], ref_a[i] = gram_b[index[module]], gram_a[index[module]]
            else:
                own_blocks(*update.factors[module], out=blocks[i])
        batch = block_figures(blocks, ref_b, ref_a, wants)
        products = [None] * len(blocked) if batch.product is None else batch.product.tolist()
        terms = {m: ChangeFigures(c, o, None if recheck else p)
                 for m, c, o, p, recheck, direct in zip(
                     blocked, batch.change.tolist(), batch.moved.tolist(), products,
                     batch.recheck.tolist(), batch.direct.tolist()) if not direct}
        norms: dict[str, float] = {}
        change = moved = 0.0
        for module, (b, a) in update.factors.items():
            reference = received.get(module)  # None: the change is B A itself
            figures = terms.get(module)
            if figures is None and reference is not None and \
                    len({b.dtype, a.dtype, *(t.dtype for t in reference)}) == 1:
                i = index[module]
                figures = change_figures(b, a, *reference, (gram_b[i], gram_a[i]), wants)
            if figures is None or not all(map(math.isfinite, figures[:2])):  # mixed
                # dtypes, or a change beyond float32's range: in float64, as `moved` does
                b64, a64 = b.double(), a.double()
                if reference is None:
                    own = product_norm(b64, a64) ** 2
                    figures = ChangeFigures(own, squared_norm(b64) + squared_norm(a64), own)
                else:
                    b_ref, a_ref = (t.double() for t in reference)
                    figures = ChangeFigures(difference_norm(b64, a64, b_ref, a_ref) ** 2,
                                            squared_norm(b64 - b_ref) + squared_norm(a64 - a_ref),
                                            None)
            change, moved = change + figures.change, moved + figures.moved
            if wants:
                norms[module] = (gram_product_norm(b, a) if figures.product is None
                                 else math.sqrt(max(figures.product, 0.0)))
        plain = dense_distance(update.dense, self.dense)
        return (math.hypot(math.sqrt(change), plain), math.hypot(math.sqrt(moved), plain),
                norms if wants else None)

    def merged_part(self, factors: Factors) -> Factors:
        """What the merge reads of a set of factors, as factors whose product the screens
        measure: B A, or A alone (B := I) when the method merges only A (fedsa-lora keeps B
        on the clients and the server's B at zero, so B A would never move)."""
        if self.method.shares != "A":
            return factors
        return {m: (torch.eye(a.shape[0], dtype=a.dtype), a) for m, (_, a) in factors.items()}

    def reference_norms(self) -> tuple[float, float]:
        """The norms of what the clients received, as `moved` and `distance` measure a
        change: of its delta W (or A) and of its factors (each with the plain tensors)."""
        received, plain = self.received(self.rank), dense_distance(self.dense, {})
        return (math.hypot(change_norm(self.merged_part(received), {}), plain),
                math.hypot(factor_distance(received, {}), plain))

    def group_changes(self, update: ClientUpdate) -> dict[str, float]:
        """lora-moe: ||T - T_ref|| of each routed expert this client trained ("expert 2") and
        of the routers and shared experts together ("routers"), which the screens compare
        among the clients that trained each; {} for an adapter without experts."""
        if not any(expert_of(k) is not None for k in update.dense):
            return {}
        squares: dict[str, float] = {}
        for key, tensor in update.dense.items():
            expert = expert_of(key)
            if expert is not None and update.experts is not None and \
                    expert not in update.experts:
                continue  # not trained by this client: not merged from it either
            group = "routers" if expert is None else f"expert {expert}"
            change = float((tensor.double() - self.dense[key].double()).square().sum())
            squares[group] = squares.get(group, 0.0) + change
        return {group: math.sqrt(total) for group, total in squares.items()}

    def distance(self, update: ClientUpdate) -> float:
        """The norm clipping bounds: ||(B - B_ref, A - A_ref, T - T_ref)||_2."""
        return math.hypot(factor_distance(update.factors, self.received(update.rank)),
                          dense_distance(update.dense, self.dense))

    # ---- one round ----------------------------------------------------------------------------
    def update(self, updates: list[ClientUpdate], server_round: int = 0,
               sketches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               folded: RunningSum | None = None) -> dict:
        """Merge one round's updates into the global state: clipping, the method's merge (or
        the robust one), DP noise (`server.defences`), the server optimiser, the figures.
        `sketches`: each update's `sketch_sides`, made as it arrived (for the exactness
        estimate of a large round; made here when None). `folded`: the updates already
        folded, in order, into the method's `running_sum` as they arrived (then the merge
        does not read them again)."""
        self.method.check(updates)  # before clipping: clipping needs matching modules
        info: dict = {}
        if self.clip_norm:
            sketches = folded = None  # the clipped updates are not the ones sketched
            updates, clip_info = defences.clip(updates, [self.received(u.rank) for u in updates],
                                               self.dense, self.clip_norm,
                                               equal=bool(self.noise_multiplier))
            info.update(clip_info)
        result = self.combine(updates, server_round, folded)
        merged, dense = result.global_factors, result.dense
        if self.noise_multiplier and (merged or dense):
            merged, dense, info[M.DP_NOISE_STD] = self.noised(merged, dense, updates,
                                                              server_round)
        if problem := defences.merge_problem(merged, dense):
            raise defences.MergeFailed(problem)  # before anything of the state changes
        self.step(merged, dense)
        made: dict[str, torch.Tensor] = {}
        if self.reuses_stack(result, updates):  # sketched as the compression makes each
            result = replace(result, residual=cast(Factors, Watched(
                result.residual, lambda m, pair: made.__setitem__(m, sketch_product(m, *pair)))))
        kept = self.add_residual(result)
        info.update(self.merge_figures(result, updates, sketches, made))
        info.update(kept)
        return info

    def reuses_stack(self, result: MergeResult, updates: list[ClientUpdate]) -> bool:
        """Whether the exactness estimate takes the sketch of the round's residual from the
        modules the residual's compression makes (each module of a residual method's stack
        is then made once a round, not twice: at 32 sites of the 7B shape a module's stack
        is d x 528)."""
        return (result.applied_is_stack and bool(result.residual) and
                self.method.exactness_defined and
                self.sketched(updates, rank_of(result.applied)))

    def combine(self, updates: list[ClientUpdate], server_round: int,
                folded: RunningSum | None = None) -> MergeResult:
        """The method's merge (from `folded` when it holds exactly these updates' weights, in
        order), or the coordinate-wise median / trimmed mean (robust), whose randomised
        re-factoring is seeded by the run's seed and the round (so a resumed run merges as
        an uninterrupted one)."""
        if folded is not None and not self.robust.replaces_merge and \
                folded.weights == [u.weight for u in updates]:
            return self.method.combine_sum(folded, updates, self.factors, export_rank=self.rank)
        if self.robust.replaces_merge and self.method.shares == "A":
            return robust_shared_a(updates, self.robust.rule, self.robust.f, self.factors)
        if self.robust.replaces_merge:
            return robust_merge(updates, self.robust.rule, self.robust.f, self.rank,
                                derive_seed(self.noise_seed, server_round, "robust"))
        return self.method.combine(updates, self.factors, export_rank=self.rank)

    def noised(self, merged: Factors, dense: Dense, updates: list[ClientUpdate],
               server_round: int) -> tuple[Factors, Dense, float]:
        """`defences.noised` with this run's settings: every lora-moe expert's noise by the
        clients that trained it, round `server_round`'s seed."""
        contributors = {k: self.method.contributors(updates, k) for k in dense}
        return defences.noised(merged, dense, self.method.shares, len(updates), contributors,
                               self.clip_norm, self.noise_multiplier,
                               derive_seed(self.noise_seed, server_round))

    def step(self, merged: Factors, dense: Dense) -> None:
        """The merge (through the server optimiser, when there is one) as the new global state;
        a plain tensor the merge did not return (an expert nobody trained) keeps its value."""
        if self.optimizer is not None:
            merged = self.optimizer.step(self.factors, merged) if merged else merged
            dense = self.optimizer.step_dense(self.dense, dense) if dense else dense
        self.factors, self.dense = merged, {**self.dense, **dense}

    def merge_figures(self, result: MergeResult, updates: list[ClientUpdate],
                      sketches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      made: dict[str, torch.Tensor] | None = None) -> dict:
        """How exactly the merge applied the updates (estimated from sketches when the exact
        figure would cost more than the merge: `sketched`), and what truncating to each
        client rank loses (fedsa-lora has no global delta W to compare; a method without
        factors none). `made`: the sketch of the round's residual, module by module, taken
        as its compression made it (`reuses_stack`); the applied update's sketch is then
        that plus the global factors'."""
        info: dict = {}
        if self.method.exactness_defined and result.applied:
            if self.sketched(updates, rank_of(result.applied)):
                if sketches is None or len(sketches) != len(updates):
                    sketches = [sketch_sides(u.factors) for u in updates]
                if made:  # applied = the stack of the global factors and the residual
                    made = {m: made[m] + sketch_product(m, *result.global_factors[m])
                            if m in result.global_factors else made[m] for m in made}
                overall, per_module = estimated_exactness(
                    result.applied, list(updates[0].factors), sketches,
                    [u.weight for u in updates], made)
                info[M.EXACTNESS_ESTIMATE] = f"sketch-{SKETCH}"
            else:
                overall, per_module = exactness(result.applied, updates)
                info[M.EXACTNESS_ESTIMATE] = "exact"
            info[M.EXACTNESS] = overall
            info[M.EXACTNESS_MAX_MODULE] = max(per_module.values(), default=0.0)
            info[M.EXACTNESS_PER_MODULE] = {short_name(m): v for m, v in per_module.items()}
        if self.method.heterogeneous and self.factors:
            losses = truncation_losses(self.factors, {r: self.received(r) for r in
                                                      sorted({u.rank for u in updates})})
            info[M.TRUNCATION_LOSS] = {str(r): loss for r, loss in losses.items()}
        return info

    def sketched(self, updates: list[ClientUpdate], applied_rank: int) -> bool:
        """Whether the exactness figure of a merge of `updates` is estimated from sketches:
        the exact one would cost more than `EXACT_BUDGET` (it grows as N^2)."""
        layers = {m: (b[0], a[1]) for m, (b, a) in factor_shapes(updates[0].factors).items()}
        return exact_cost(layers, [u.rank for u in updates], applied_rank) > EXACT_BUDGET

    def add_residual(self, result: MergeResult) -> dict:
        """Add the merge's residual to the frozen one (as the method keeps it); its figures."""
        if not result.residual:
            return {}
        self.residual, dropped = self.method.keep_residual(
            concat([self.residual, result.residual]))
        return {M.RESIDUAL_RANK: rank_of(self.residual), M.RESIDUAL_DROPPED: dropped}

    # ---- export -------------------------------------------------------------------------------
    def export(self) -> tuple[dict[str, torch.Tensor], int]:
        """(wire state in PEFT scale, rank): one PEFT adapter equal to adapter + residual,
        plus the plain tensors of a method without factors (rank 0 then)."""
        combined = concat([self.factors, self.residual])
        rank = rank_of(combined)
        factors = to_peft(combined, self.scale(rank)) if rank else {}
        return {**factors, **self.dense}, rank


    # ---- checkpoint ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Global factors, residual (delta-W scale) and optimiser state as named tensors."""
        out = {f"global/{k}": v for k, v in flatten(self.factors).items()}
        out.update({f"residual/{k}": v for k, v in flatten(self.residual).items()})
        out.update({f"dense/{k}": v for k, v in self.dense.items()})
        if self.optimizer is not None:
            out.update({f"optimizer/{k}": v for k, v in self.optimizer.state_dict().items()})
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what `tensors()` saved (the inverse; shapes are checked by the caller's use)."""
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items()
                               if k.startswith(prefix)}
        saved = part("global/")
        if saved and set(saved) != set(flatten(self.factors)):
            raise ValueError("the checkpoint's global adapter has other modules than this "
                             "run's model; was the run's model or target-modules changed?")
        self.factors = unflatten(saved) if saved else {}
        residual = part("residual/")
        self.residual = unflatten(residual) if residual else {}
        dense = part("dense/")
        if dense.keys() != self.dense.keys():
            raise ValueError("the checkpoint's tensors differ from this run's PEFT method and "
                             "model; was peft, the model or target-modules changed?")
        self.dense = {k: v.to(torch.float32) for k, v in dense.items()}
        if self.optimizer is not None:
            self.optimizer.load_state_dict(part("optimizer/"))
