"""strings: reverse, capitalise, measure and inspect a made-up word."""

from __future__ import annotations

import random

from fedlora.data.tasks.registry import Record, same_number, same_text, task, unique
from fedlora.data.tasks.words import pseudo_word

NUMERIC = ("length", "count")


def strings_example(rng: random.Random) -> Record:
    """One question about a pseudo-word of 2-3 syllables."""
    word = pseudo_word(rng)
    kind = rng.choice(("reverse", "upper", "length", "count", "first", "last"))
    if kind == "reverse":
        instruction, answer = f'Reverse the letters of the word "{word}".', word[::-1]
    elif kind == "upper":
        instruction, answer = f'Write the word "{word}" in capital letters.', word.upper()
    elif kind == "length":
        instruction, answer = f'How many letters are in the word "{word}"?', str(len(word))
    elif kind == "count":
        letter = rng.choice(sorted(set(word)) + ["a", "e", "o"])
        instruction = f'How many times does the letter "{letter}" appear in the word "{word}"?'
        answer = str(word.count(letter))
    elif kind == "first":
        instruction, answer = f'What is the first letter of the word "{word}"?', word[0]
    else:
        instruction, answer = f'What is the last letter of the word "{word}"?', word[-1]
    hint = " Reply with the number only." if kind in NUMERIC else (
        " Reply with the letter only." if kind in ("first", "last") else
        " Reply with the word only.")
    return {"instruction": instruction + hint, "input": "", "output": answer,
            "task": "strings", "kind": kind}


def score(prediction: str, record: Record) -> bool:
    """Counts compare as numbers; `upper` is case-sensitive, the other kinds ignore case."""
    if record.get("kind") in NUMERIC:
        return same_number(prediction, record["output"])
    return same_text(prediction, record["output"], case=record.get("kind") == "upper")


@task("strings", score)
def strings(n: int, seed: int) -> list[Record]:
    """String manipulation on made-up words, distinct questions."""
    return unique(strings_example, n, seed)
