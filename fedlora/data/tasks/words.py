"""Pronounceable made-up words, names and places, drawn from syllables (no word lists)."""

from __future__ import annotations

import random

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "st", "tr", "sh")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "", "n", "r", "l", "s")


def pseudo_word(rng: random.Random, syllables: int | None = None) -> str:
    """A lowercase made-up word of 2-3 syllables, e.g. 'drelom'."""
    count = syllables or rng.choice((2, 2, 3))
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(count))


def fresh_word(rng: random.Random, used: set[str], syllables: int | None = None,
               suffix: str = "") -> str:
    """A pseudo-word (plus `suffix`) not in `used`, which it joins."""
    while True:
        word = pseudo_word(rng, syllables) + suffix
        if word not in used:
            used.add(word)
            return word


def person(rng: random.Random) -> str:
    """A made-up full name, e.g. 'Mira Tolvan'."""
    return f"{pseudo_word(rng, 2).capitalize()} {pseudo_word(rng).capitalize()}"
