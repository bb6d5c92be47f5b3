"""One way to derive the seed of a draw from the run's seed and what the draw is for.

Every random draw of a run (a client's rank, its training order, a module's initial factors, a
round's sampling and DP noise) takes its own seed from `derive_seed(seed, *parts)`, so two draws
for different purposes never share a stream, and a draw is the same on every machine.
"""

from __future__ import annotations

import zlib

SEED_MIX = 1_000_003  # a prime: the default multiplier between parts
INIT_MIX = 7919  # a prime: the multiplier of the initial values (adapters, built-in tasks)


def derive_seed(seed: int, *parts: int | str, mix: int = SEED_MIX) -> int:
    """`seed` mixed with each part in turn (s -> s * mix + part); a str part counts as its
    CRC-32, so a module's name gives it a seed of its own on every machine."""
    for part in parts:
        seed = seed * mix + (zlib.crc32(part.encode()) if isinstance(part, str) else part)
    return seed
