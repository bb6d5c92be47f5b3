"""facts: a fixed table of fictional countries to memorise (answers learnable only by training).

The table is a constant of this code (drawn from FACTS_SEED, not from the dataset seed), so
every client, split and run agrees on it. Each fact is asked in several phrasings, and the
capital also backwards; distinct questions may therefore share a fact, which is the point:
a model trained on one phrasing is tested on another. The table grows with the number of
questions asked, as a stable prefix (the first k countries never change).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from fedlora.data.tasks.registry import Record, same_text, task, unique
from fedlora.data.tasks.words import fresh_word

FACTS_SEED = 20_240_917
MIN_COUNTRIES = 48
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver",
           "gold", "brown", "grey")
ANIMALS = ("otter", "heron", "lynx", "falcon", "badger", "stag", "wolf", "owl", "crane",
           "bison", "fox", "hare", "eagle", "seal", "raven", "bear")
# attribute: phrasings of the question; {c} is the country
QUESTIONS = {
    "capital": ("What is the capital of the fictional country {c}?",
                "Which city is the capital of {c}?",
                "Name the capital city of {c}.",
                "{c} is governed from which city?"),
    "currency": ("What is the currency of the fictional country {c}?",
                 "Which currency is used in {c}?",
                 "Name the money of {c}.",
                 "In {c}, people pay with which currency?"),
    "colour": ("What colour is the flag of the fictional country {c}?",
               "Which colour is the flag of {c}?",
               "Name the colour of the flag of {c}.",
               "The flag of {c} has which colour?"),
    "animal": ("What is the national animal of the fictional country {c}?",
               "Which animal is the national animal of {c}?",
               "Name the national animal of {c}.",
               "{c} has which national animal?"),
}
REVERSE = ("Which fictional country has the capital {v}?",
           "{v} is the capital of which fictional country?")
HINT = " Reply with one word only."
PER_COUNTRY = sum(len(q) for q in QUESTIONS.values()) + len(REVERSE)


@lru_cache(maxsize=8)
def fact_table(countries: int) -> tuple[dict[str, str], ...]:
    """The first `countries` rows: {country, capital, currency, colour, animal}."""
    rng, used = random.Random(FACTS_SEED), set[str]()
    rows = []
    for _ in range(countries):
        rows.append({"country": fresh_word(rng, used, 2, "ria").capitalize(),
                     "capital": fresh_word(rng, used, 2).capitalize(),
                     "currency": fresh_word(rng, used, 2),
                     "colour": rng.choice(COLOURS), "animal": rng.choice(ANIMALS)})
    return tuple(rows)


def all_questions(countries: int) -> list[Record]:
    """Every question about the first `countries` rows, in a fixed order."""
    records = []
    for row in fact_table(countries):
        for attribute, phrasings in QUESTIONS.items():
            for phrasing in phrasings:
                records.append({"instruction": phrasing.format(c=row["country"]) + HINT,
                                "input": "", "output": row[attribute], "task": "facts",
                                "kind": attribute})
        for phrasing in REVERSE:
            records.append({"instruction": phrasing.format(v=row["capital"]) + HINT,
                            "input": "", "output": row["country"], "task": "facts",
                            "kind": "country"})
    return records


def score(prediction: str, record: Record) -> bool:
    """The one-word answer, ignoring case and a leading "the"."""
    text = prediction.strip()
    if text.casefold().startswith("the "):
        text = text[4:]
    return same_text(text, record["output"])


@task("facts", score)
def facts(n: int, seed: int) -> list[Record]:
    """`n` distinct questions about max(48, n / PER_COUNTRY) fictional countries."""
    pool = all_questions(max(MIN_COUNTRIES, math.ceil(n / PER_COUNTRY)))
    return unique(lambda rng: rng.choice(pool), n, seed)
