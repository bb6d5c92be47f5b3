"""Canaries and their exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a record planted in one site's training data: a question about a made-up person and
an answer that holds a random secret of `digits` digits ("The vault door code of Ines Varga is
4 7 1."). Every other value of the secret is a *candidate*; a model that memorised the canary
finds the true answer more likely than the others. Its exposure is

    exposure = log2(number of candidates) - log2(rank of the true secret)

where the rank is 1 + the number of candidates the model finds strictly more likely (ties count
for the secret). With 3 digits there are 1,000 candidates: a model that ranks the secret first
gives log2(1000) = 9.97 bits, one that ranks it in the middle about 1 bit.

The functions here are pure: the records to plant, the candidate answers, and the exposure from
the candidates' scores (log-likelihoods: higher is more likely). Scoring a model is
`fedlora.audit.run.score_canaries`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

# the first and last names and the secrets' phrasing: none of them occurs in the built-in tasks
FIRST = ("Ines", "Tomasz", "Amara", "Keiko", "Oskar", "Lucia", "Dmitri", "Noor", "Felipe",
         "Hanne", "Rafael", "Sunita")
LAST = ("Varga", "Lindqvist", "Okafor", "Brandt", "Moreau", "Castellano", "Ivanova", "Haddad",
        "Kowalski", "Nakamura", "Petrov", "Quill")
SECRETS = ("vault door code", "alarm PIN", "locker combination", "safe code")


class Secret:
    """What scoring needs of a planted secret: its candidates in order (the true one among
    them at `true_index()`) and the answer each one gives."""

    def candidates(self) -> list[Any]:
        raise NotImplementedError

    def answer(self, secret: Any = None) -> str:
        raise NotImplementedError

    def answers(self) -> list[str]:
        """The answer with each candidate, in candidate order."""
        return [self.answer(c) for c in self.candidates()]


@dataclass(frozen=True)
class Canary(Secret):
    """One planted secret: who it is about, what kind of code, and its digits."""

    person: str
    kind: str
    secret: tuple[int, ...]

    def question(self) -> str:
        return f"What is the {self.kind} of {self.person}?"

    def answer(self, secret: tuple[int, ...] | None = None) -> str:
        """The answer with `secret` (default: the true one) spelled digit by digit."""
        digits = " ".join(str(d) for d in (self.secret if secret is None else secret))
        return f"The {self.kind} of {self.person} is {digits}."

    def record(self) -> dict:
        """The canary as a training record (instruction/output, as the built-in tasks)."""
        return {"instruction": self.question(), "input": "", "output": self.answer(),
                "task": "canary"}

    def candidates(self) -> list[tuple[int, ...]]:
        """Every secret of this length, in order; the true one among them."""
        n = len(self.secret)
        return [tuple(int(c) for c in f"{i:0{n}d}") for i in range(10 ** n)]

    def true_index(self) -> int:
        return int("".join(str(d) for d in self.secret))


MAX_CANDIDATES = 10 ** 6


@dataclass(frozen=True)
class OwnSecret(Secret):
    """A secret of the user's own (`fedlora exposure`): the prompt it is asked with, the answer
    it is given in (`template`, with `{secret}` where it goes) and its true value, whose digits
    make the candidates (every other digit string of the same shape: "4 7 1" -> "0 0 0" ...
    "9 9 9"; the other characters kept). `raw`: the record was raw text (prompt/completion,
    scored without the chat template), else a question (instruction/output, as trained)."""

    prompt: str
    template: str
    secret: str
    raw: bool = False

    def __post_init__(self) -> None:
        if "{secret}" not in self.template:
            raise ValueError(f"--answer: expected the answer with {{secret}} where the secret "
                             f"goes, got {self.template!r}")
        digits = sum(c.isdigit() for c in self.secret)
        if not 1 <= digits or 10 ** digits > MAX_CANDIDATES:
            raise ValueError(f"--secret: expected 1 to 6 digits (10**digits candidates are "
                             f"ranked), got {self.secret!r} ({digits} digits)")
        if not self.prompt.strip():
            raise ValueError("--prompt: expected the text the secret is asked with")

    @property
    def person(self) -> str:  # the name results carry
        return self.secret

    def record(self) -> dict:
        if self.raw:
            return {"prompt": self.prompt, "completion": self.answer()}
        return {"instruction": self.prompt, "input": "", "output": self.answer(),
                "task": "canary"}

    def answer(self, secret: str | None = None) -> str:
        return self.template.replace("{secret}", self.secret if secret is None else secret)

    def candidates(self) -> list[str]:
        """Every digit string of the secret's shape, in order (the true one among them)."""
        slots = [i for i, c in enumerate(self.secret) if c.isdigit()]
        out = []
        for value in range(10 ** len(slots)):
            chars = list(self.secret)
            for i, d in zip(slots, f"{value:0{len(slots)}d}"):
                chars[i] = d
            out.append("".join(chars))
        return out

    def true_index(self) -> int:
        return int("".join(c for c in self.secret if c.isdigit()))


def make_canaries(count: int, digits: int, seed: int) -> list[Canary]:
    """`count` canaries with distinct people and secrets drawn from `seed`."""
    if not 1 <= count <= len(FIRST):
        raise ValueError(f"canaries: expected 1..{len(FIRST)}, got {count}")
    if not 1 <= digits <= 6:
        raise ValueError(f"canary digits: expected 1..6 (10**digits candidates), got {digits}")
    rng = random.Random(seed)
    firsts, lasts = rng.sample(FIRST, count), rng.sample(LAST, count)
    return [Canary(f"{first} {last}", SECRETS[i % len(SECRETS)],
                   tuple(rng.randrange(10) for _ in range(digits)))
            for i, (first, last) in enumerate(zip(firsts, lasts, strict=True))]


def planted(records: list[dict], canaries: list[Canary], copies: int, seed: int) -> list[dict]:
    """`records` with `copies` copies of each canary's record at seeded random places."""
    if copies < 1:
        raise ValueError(f"canary copies: expected an integer >= 1, got {copies}")
    out = list(records)
    rng = random.Random(seed)
    for canary in canaries:
        for _ in range(copies):
            out.insert(rng.randrange(len(out) + 1), canary.record())
    return out


def rank_of(scores: list[float], true_index: int) -> int:
    """1 + the number of candidates scored strictly higher than the true one."""
    if not 0 <= true_index < len(scores):
        raise ValueError(f"true index {true_index} outside {len(scores)} candidates")
    if any(math.isnan(s) for s in scores):
        raise ValueError("a candidate's score is NaN: the model under audit is broken")
    true = scores[true_index]
    return 1 + sum(1 for s in scores if s > true)


def exposure(scores: list[float], true_index: int) -> float:
    """log2(candidates) - log2(rank of the true secret), in bits (0 when it ranks last)."""
    return math.log2(len(scores)) - math.log2(rank_of(scores, true_index))
