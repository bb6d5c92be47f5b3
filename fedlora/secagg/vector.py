"""What a site adds to the secure sum: its weighted update as one vector of integers mod 2^32.

Layout: every shared tensor's change from what the site received, flattened in sorted key
order, multiplied by the site's weight ratio w = min(num-examples / secagg-max-weight, 1)
(1 with client-weights=equal), divided by the clipping range c (secagg-clip) and clipped to
[-1, 1]; then w itself, once per weight group (lora-moe: each expert is a group, and a site
puts w in the groups it trained, 0 and zero tensors in the others). Each entry is rounded
stochastically (unbiased) to an integer in [-L, L], L = 2^(bits-1) - 1, and kept mod 2^32.
With bits = 32 - ceil(log2 n) for n sites the sum of n such vectors never wraps, so the
integer sum read as int32 is exact, and the dequantised sum differs from the plain sum by at
most n c / L per entry (c / L per site, the rounding's step), with mean 0. One honest site
moves any entry of the sum by at most c and each weight sum by at most 1: the bound the
quantisation range states.

Pure functions over numpy arrays; no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32  # arithmetic mod 2^32: numpy's uint32 wraps on overflow


def bits_for(sites: int) -> int:
    """Bits per entry (sign included) such that the sum of `sites` entries never wraps."""
    if sites < 1:
        raise ValueError(f"secure aggregation: expected at least 1 site, got {sites}")
    return MODULUS_BITS - max(1, math.ceil(math.log2(sites)))


ALL = "all"  # the weight group of every tensor, unless a method groups them (lora-moe)


@dataclass(frozen=True)
class Layout:
    """Where each tensor sits in the vector: (key, shape) in sorted key order, then one weight
    per weight group (`groups`, sorted; one group, "all", unless the method averages some
    tensors over fewer sites: lora-moe's experts, each over the sites that trained it)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]
    groups: tuple[str, ...] = (ALL,)
    group_of: tuple[int, ...] = ()  # each entry's index into `groups` (empty: all group 0)

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]],
           group: Callable[[str], str] | None = None) -> Layout:
        """The layout of `shapes`, each key in weight group `group(key)` (default: one)."""
        keys = sorted(shapes)
        if group is None:
            return cls(tuple((k, tuple(shapes[k])) for k in keys))
        names = tuple(sorted({group(k) for k in keys}))
        return cls(tuple((k, tuple(shapes[k])) for k in keys), names,
                   tuple(names.index(group(k)) for k in keys))

    @property
    def size(self) -> int:
        """Entries of the vector: every tensor's values and the weights."""
        return sum(math.prod(s) for _, s in self.entries) + len(self.groups)

    def group_index(self, i: int) -> int:
        return self.group_of[i] if self.group_of else 0

    def flatten(self, tensors: dict[str, np.ndarray], weight: float,
                trained: Collection[str] | None = None) -> np.ndarray:
        """weight * each tensor, flattened in layout order, with each group's weight appended
        (float64): `weight` for the groups in `trained` (None: all), 0 for the others and
        their tensors. A missing or misshapen tensor is a ValueError."""
        if set(tensors) != {k for k, _ in self.entries}:
            raise ValueError(f"secure aggregation: expected tensors {[k for k, _ in self.entries]}"
                             f", got {sorted(tensors)}")
        weights = [weight if trained is None or g in trained else 0.0 for g in self.groups]
        parts = []
        for i, (key, shape) in enumerate(self.entries):
            value = np.asarray(tensors[key], dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"secure aggregation: tensor {key!r} has shape {value.shape}, "
                                 f"expected {shape}")
            parts.append(weights[self.group_index(i)] * value.reshape(-1))
        return np.concatenate([*parts, np.array(weights)])

    def split(self, vector: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The inverse of `flatten`: (tensors, each group's weight)."""
        if vector.shape != (self.size,):
            raise ValueError(f"secure aggregation: expected a vector of {self.size} entries, "
                             f"got shape {vector.shape}")
        out, at = {}, 0
        for key, shape in self.entries:
            n = math.prod(shape)
            out[key] = vector[at:at + n].reshape(shape)
            at += n
        return out, {g: float(w) for g, w in zip(self.groups, vector[at:])}

    def key_groups(self) -> dict[str, str]:
        """Each tensor's weight group."""
        return {k: self.groups[self.group_index(i)] for i, (k, _) in enumerate(self.entries)}


@dataclass(frozen=True)
class Quantizer:
    """Values in [-clip, clip] (the weights in [0, 1]) <-> integers in [-L, L] mod 2^32."""

    clip: float
    bits: int
    weights: int = 1  # the vector's last entries: the weight groups' weights

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"secagg-clip: expected a number > 0, got {self.clip}")
        if not 2 <= self.bits <= MODULUS_BITS - 1:
            raise ValueError(f"secure aggregation: expected 2..31 bits, got {self.bits}")

    @property
    def levels(self) -> int:
        """L: the largest integer one entry quantises to."""
        return 2 ** (self.bits - 1) - 1

    def scales(self, size: int) -> np.ndarray:
        """What one integer step is worth, per entry: clip / L for the values, 1 / L for the
        weights (the last `weights` entries)."""
        scale = np.full(size, self.clip / self.levels)
        scale[size - self.weights:] = 1.0 / self.levels
        return scale

    def quantize(self, vector: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(the vector as uint32 mod 2^32, how many values were clipped): stochastic rounding,
        so E[dequantize(quantize(v))] = v inside the range."""
        scaled = vector / self.scales(vector.size)
        clipped = int(np.count_nonzero(np.abs(scaled) > self.levels))
        scaled = np.clip(scaled, -self.levels, self.levels)
        low = np.floor(scaled)
        q = low + (rng.random(scaled.shape) < scaled - low)
        return q.astype(np.int64).astype(np.uint32), clipped

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """A sum of quantised vectors (uint32, mod 2^32) back to floats: read as int32."""
        return total.astype(np.uint32).view(np.int32).astype(np.float64) * self.scales(total.size)
