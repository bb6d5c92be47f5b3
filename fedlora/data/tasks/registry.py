"""The registry of built-in task families and the answer normalisation their scorers share.

A family is a generator `(n, seed) -> records` registered with `@task(name, scorer)`; records
are `{instruction, input, output, task, kind}` (task = the family, kind = its question type),
and the scorer `(prediction, record) -> bool` is an exact match after normalisation.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

from fedlora.data.format import to_messages

Record = dict[str, str]
Generator = Callable[[int, int], list[Record]]
Scorer = Callable[[str, Record], bool]

TASKS: dict[str, Generator] = {}
SCORERS: dict[str, Scorer] = {}


def task(name: str, scorer: Scorer | None = None):
    """Register a generator `(n, seed) -> records` under `builtin:<name>`, with its scorer."""

    def wrap(fn: Generator) -> Generator:
        TASKS[name] = fn
        if scorer is not None:
            SCORERS[name] = scorer
        return fn

    return wrap


def question(record: Record) -> tuple[str, str]:
    """What a model is asked: two records with the same question must not straddle a split."""
    return record["instruction"], record.get("input", "")


def unique(make: Callable[[random.Random], Record], n: int, seed: int) -> list[Record]:
    """`n` records with distinct questions (so a train/test split never leaks an answer)."""
    rng, seen, records = random.Random(seed), set[tuple[str, str]](), list[dict]()
    for _ in range(50 * n + 1000):
        if len(records) == n:
            return records
        record = make(rng)
        if question(record) not in seen:
            seen.add(question(record))
            records.append(record)
    raise ValueError(f"setting 'dataset-size': this built-in task gave only {len(records)} "
                     f"distinct questions, fewer than the {n} asked for; lower dataset-size, or "
                     f"use builtin:suite (every family)")


# ---- normalisation shared by the scorers ----

QUOTES = "\"'`“”‘’"


def first_line(text: str) -> str:
    """The first non-empty line: a model that goes on after its answer is judged on the answer."""
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def clean(text: str) -> str:
    """First line, whitespace collapsed, surrounding quotes and a trailing period removed."""
    text = " ".join(first_line(text).split())
    text = text.rstrip(".").strip().strip(QUOTES).strip()
    return text.rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """A plain number (`1,234`, `-5`, `5.0`, unicode minus) or None."""
    text = clean(text).replace("\u2212", "-")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", text):
        return None
    return float(text)


def same_number(prediction: str, answer: str) -> bool:
    """The prediction is the answer's number (formatting aside)."""
    value = parse_number(prediction)
    return value is not None and value == parse_number(answer)


def same_text(prediction: str, answer: str, case: bool = False) -> bool:
    """Equal after `clean`; case-insensitive unless `case`."""
    a, b = clean(prediction), clean(answer)
    return a == b if case else a.casefold() == b.casefold()


def parse_json(text: str) -> object:
    """The JSON value in a prediction, allowing a ```json fence around it; None if none."""
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def exact(prediction: str, record: dict) -> bool:
    """Scorer for data without a family: the answer (`output`, `completion`, or a chat
    record's last message) trimmed as in `clean`, case-sensitive."""
    return same_text(prediction, to_messages(record)[-1]["content"], case=True)
