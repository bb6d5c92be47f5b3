"""The server's global adapter across rounds: merge, server optimiser, residual, payloads, export.

No Flower here: `server/strategy.py` turns messages into `ClientUpdate`s and calls `update()`.
Everything is kept in delta-W scale (the LoRA scale folded into B, so delta W = B @ A) and only
converted to PEFT's scale at the edges (`payload`, `export`), with each adapter's own rank:
moving an update between ranks never changes delta W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlora.adapters import join_factors, split_factors
from fedlora.aggregation import ClientUpdate, Factors, Strategy
from fedlora.aggregation.exactness import compress, exactness, truncation_loss
from fedlora.aggregation.privacy import add_noise, clip_update, noise_std
from fedlora.aggregation.scaling import from_delta, lora_scale, to_delta
from fedlora.config import LoraSettings


def concat(parts: list[Factors]) -> Factors:
    """Factors whose product is the sum of the parts' products (stacked along the rank)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {m: (torch.cat([p[m][0] for p in parts], dim=1), torch.cat([p[m][1] for p in parts]))
            for m in parts[0]}


def short_name(module: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'layers.0.self_attn.q_proj'."""
    return module.removeprefix("base_model.model.").removeprefix("model.")


def rank_of(factors: Factors) -> int:
    """Rank of a set of factors (0 when empty)."""
    return next(iter(factors.values()))[0].shape[1] if factors else 0


@dataclass
class GlobalAdapter:
    """Global factors, frozen residual and server-optimiser state of one run."""

    strategy: Strategy
    lora: LoraSettings  # alpha and rsLoRA of every client; the rank is per adapter
    factors: Factors  # the global adapter, delta-W scale, at the global rank
    global_rank: int  # clients train at ranks <= this; evaluation uses it (flora: fresh)
    residual_budget: int
    optimizer: object | None = None  # fedlora.aggregation.server_opt optimiser, or None
    residual: Factors = field(default_factory=dict)
    clip_norm: float = 0.0  # clip each update to this norm (0 = off)
    noise_multiplier: float = 0.0  # client-level DP noise (needs clip_norm and a linear merge)
    noise_seed: int = 0  # the noise of round n is drawn from seed (noise_seed, n)

    @property
    def rank(self) -> int:
        """Rank of the global adapter (fixed for the run, also when flora keeps it empty)."""
        return self.global_rank

    def scale(self, rank: int) -> float:
        """LoRA scale of an adapter of this rank (alpha/r or alpha/sqrt(r))."""
        return lora_scale(rank, self.lora.alpha, self.lora.use_rslora)

    # ---- what goes to clients ----------------------------------------------------------------
    def payload(self, rank: int) -> dict[str, torch.Tensor]:
        """Global adapter for a client of `rank`, in PEFT's scale, wire keys (maybe empty)."""
        if self.strategy.fresh_adapter or not self.factors:
            return {}
        return join_factors(from_delta(self.strategy.payload(self.factors, rank),
                                       self.scale(rank)))

    def residual_state(self) -> dict[str, torch.Tensor]:
        """The frozen residual (delta W = B @ A), wire keys; empty when there is none."""
        return join_factors(self.residual)

    # ---- what comes back ----------------------------------------------------------------------
    def to_update(self, state: dict[str, torch.Tensor], rank: int, weight: float) -> ClientUpdate:
        """A client's reply (PEFT scale; ffa-lora sends only B, fedsa-lora only A) as a
        delta-W ClientUpdate; the factor it did not send is the one it received."""
        raw = self.payload(rank)
        raw.update({k: v.to(torch.float32) for k, v in state.items()})
        return ClientUpdate(to_delta(split_factors(raw), self.scale(rank)), weight)

    # ---- one round ----------------------------------------------------------------------------
    def received(self, rank: int) -> Factors:
        """What a rank-`rank` client received this round (delta-W scale): the reference its
        update is measured and clipped around."""
        return self.strategy.payload(self.factors, rank)

    def clip(self, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict]:
        """Each update clipped to clip_norm around the adapter its client received; with DP,
        equal weights (the Gaussian mechanism bounds each client, not each example)."""
        out, norms = [], []
        for u in updates:
            factors, norm, _ = clip_update(u.factors, self.received(u.rank), self.clip_norm)
            out.append(ClientUpdate(factors, 1.0 if self.noise_multiplier else u.weight))
            norms.append(norm)
        return out, {"clip-norm": self.clip_norm, "update-norms": norms,
                     "clients-clipped": sum(n > self.clip_norm for n in norms)}

    def noised(self, merged: Factors, num_updates: int, server_round: int
               ) -> tuple[Factors, float]:
        """The merged factors plus Gaussian noise of std z C / m on the shared factors."""
        std = noise_std(self.noise_multiplier, self.clip_norm, num_updates)
        generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + server_round)
        return add_noise(merged, std, self.strategy.shares, generator), std

    def update(self, updates: list[ClientUpdate], server_round: int = 0) -> dict:
        """Merge one round's updates into the global state; returns the round's figures."""
        self.strategy.check(updates)
        info: dict = {}
        if self.clip_norm:
            updates, clip_info = self.clip(updates)
            info.update(clip_info)
        result = self.strategy.merge(updates, self.factors, export_rank=self.rank)
        merged = result.global_factors
        if self.noise_multiplier and merged:
            merged, info["dp-noise-std"] = self.noised(merged, len(updates), server_round)
        if self.optimizer is not None and merged:
            merged = self.optimizer.step(self.factors, merged)
        self.factors = merged
        if self.strategy.exactness_defined:  # fedsa-lora has no global delta W to compare
            overall, per_module = exactness(result.applied, updates)
            info["exactness"] = overall
            info["exactness-max-module"] = max(per_module.values(), default=0.0)
            info["exactness-per-module"] = {short_name(m): v for m, v in per_module.items()}
        if self.strategy.heterogeneous and self.factors:
            info["truncation-loss"] = {str(r): truncation_loss(self.factors, r, self.strategy)
                                       for r in sorted({u.rank for u in updates})}
        if result.residual:
            self.residual, dropped = compress(concat([self.residual, result.residual]),
                                              self.residual_budget)
            info.update({"residual-rank": rank_of(self.residual), "residual-dropped": dropped})
        return info

    # ---- export -------------------------------------------------------------------------------
    def export(self) -> tuple[dict[str, torch.Tensor], int]:
        """(wire state in PEFT scale, rank): one PEFT adapter equal to adapter + residual."""
        combined = concat([self.factors, self.residual])
        rank = rank_of(combined)
        if rank == 0:
            return {}, 0
        return join_factors(from_delta(combined, self.scale(rank))), rank


    # ---- checkpoint ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Global factors, residual (delta-W scale) and optimiser state as named tensors."""
        out = {f"global/{k}": v for k, v in join_factors(self.factors).items()}
        out.update({f"residual/{k}": v for k, v in join_factors(self.residual).items()})
        if self.optimizer is not None:
            out.update({f"optimizer/{k}": v for k, v in self.optimizer.state_dict().items()})
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what `tensors()` saved (the inverse; shapes are checked by the caller's use)."""
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items()
                               if k.startswith(prefix)}
        saved = part("global/")
        if saved and set(saved) != set(join_factors(self.factors)):
            raise ValueError("the checkpoint's global adapter has other modules than this "
                             "run's model; was the run's model or target-modules changed?")
        self.factors = split_factors(saved) if saved else {}
        residual = part("residual/")
        self.residual = split_factors(residual) if residual else {}
        if self.optimizer is not None:
            self.optimizer.load_state_dict(part("optimizer/"))
