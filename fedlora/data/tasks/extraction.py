"""json: extract two fields of a sentence as a small JSON object."""

from __future__ import annotations

import json
import random

from fedlora.data.tasks.registry import Record, parse_json, task, unique
from fedlora.data.tasks.words import person, pseudo_word

ITEMS = ("lanterns", "candles", "barrels", "blankets", "lamps", "ropes", "baskets", "kettles",
         "buckets", "shovels", "chairs", "mirrors", "boots", "coats", "maps", "clocks")
# kind: (instruction, sentence templates); {name} {age} {city} {item} {quantity}
KINDS = {
    "person": ('Extract the name and age as JSON with keys "name" and "age".',
               ("{name} is {age} years old.",
                "At {age}, {name} moved to {city}.",
                "{name}, aged {age}, works in {city}.",
                "Last spring {name} turned {age}.")),
    "place": ('Extract the name and city as JSON with keys "name" and "city".',
              ("{name} lives in {city}.",
               "Born in {city}, {name} is {age} years old.",
               "{name} took the train to {city} yesterday.",
               "The office of {name} is in {city}.")),
    "order": ('Extract the item and quantity as JSON with keys "item" and "quantity".',
              ("Please send {quantity} {item} to {city}.",
               "{name} ordered {quantity} {item}.",
               "We need {quantity} {item} by Friday.",
               "The shop in {city} sold {quantity} {item} today.")),
}
KEYS = {"person": ("name", "age"), "place": ("name", "city"), "order": ("item", "quantity")}


def extraction_example(rng: random.Random) -> Record:
    """One sentence about a made-up person, place or order, and the JSON of two of its fields."""
    kind = rng.choice(sorted(KINDS))
    instruction, templates = KINDS[kind]
    values = {"name": person(rng), "age": rng.randint(18, 90),
              "city": pseudo_word(rng).capitalize(), "item": rng.choice(ITEMS),
              "quantity": rng.randint(2, 500)}
    answer = {key: values[key] for key in KEYS[kind]}
    return {"instruction": instruction + " Reply with the JSON only.",
            "input": rng.choice(templates).format(**values), "output": json.dumps(answer),
            "task": "json", "kind": kind}


def score(prediction: str, record: Record) -> bool:
    """The parsed JSON equals the answer's (key order and spacing aside; a ``` fence allowed)."""
    value = parse_json(prediction)
    return value is not None and value == json.loads(record["output"])


@task("json", score)
def extraction(n: int, seed: int) -> list[Record]:
    """Structured extraction to JSON, distinct (instruction, sentence) questions."""
    return unique(extraction_example, n, seed)
