"""units: convert a whole number between units related by a whole factor (km to m, h to min)."""

from __future__ import annotations

import random
import re

from fedlora.data.tasks.registry import Record, clean, same_number, task, unique

# unit: (singular, plural, symbol)
UNITS = {
    "km": ("kilometer", "kilometers", "km"), "m": ("meter", "meters", "m"),
    "cm": ("centimeter", "centimeters", "cm"), "mm": ("millimeter", "millimeters", "mm"),
    "t": ("tonne", "tonnes", "t"), "kg": ("kilogram", "kilograms", "kg"),
    "g": ("gram", "grams", "g"), "mg": ("milligram", "milligrams", "mg"),
    "l": ("liter", "liters", "L"), "ml": ("milliliter", "milliliters", "mL"),
    "week": ("week", "weeks", "wk"), "day": ("day", "days", "d"),
    "h": ("hour", "hours", "h"), "min": ("minute", "minutes", "min"),
    "s": ("second", "seconds", "s"), "yd": ("yard", "yards", "yd"),
    "ft": ("foot", "feet", "ft"), "in": ("inch", "inches", "in"),
    "lb": ("pound", "pounds", "lb"), "oz": ("ounce", "ounces", "oz"),
}
# (larger, smaller, how many smaller in one larger, kind)
CONVERSIONS = (
    ("km", "m", 1000, "length"), ("m", "cm", 100, "length"), ("cm", "mm", 10, "length"),
    ("m", "mm", 1000, "length"), ("t", "kg", 1000, "mass"), ("kg", "g", 1000, "mass"),
    ("g", "mg", 1000, "mass"), ("l", "ml", 1000, "volume"), ("week", "day", 7, "time"),
    ("day", "h", 24, "time"), ("h", "min", 60, "time"), ("min", "s", 60, "time"),
    ("yd", "ft", 3, "imperial"), ("ft", "in", 12, "imperial"), ("lb", "oz", 16, "imperial"),
)
TEMPLATE = "Convert {value} {source} to {target}. Reply with the number only."


def name(unit: str, value: int) -> str:
    singular, plural, _ = UNITS[unit]
    return singular if value == 1 else plural


def units_example(rng: random.Random) -> Record:
    """Larger to smaller (multiply) or smaller to larger (divide); answers are whole numbers."""
    large, small, factor, kind = rng.choice(CONVERSIONS)
    count = rng.randint(1, 120)  # the number of larger units
    if rng.random() < 0.5:
        value, source, target, answer = count, large, small, count * factor
    else:
        value, source, target, answer = count * factor, small, large, count
    instruction = TEMPLATE.format(value=value, source=name(source, value),
                                  target=UNITS[target][1])
    return {"instruction": instruction, "input": "", "output": str(answer), "task": "units",
            "kind": kind}


def score(prediction: str, record: Record) -> bool:
    """The same number, optionally followed by the target unit: `3000`, `3,000 meters`, `3000 m`."""
    match = re.search(r" to (.+?)\. Reply", record["instruction"])
    if match is None:
        return False
    target = match.group(1)
    names = {n.casefold() for u in UNITS.values() if u[1] == target for n in u}
    text = clean(prediction)
    number, _, unit = text.partition(" ")
    if unit and unit.casefold() in names:
        text = number
    return same_number(text, record["output"])


@task("units", score)
def units(n: int, seed: int) -> list[Record]:
    """Unit conversions with whole-number answers, distinct questions."""
    return unique(units_example, n, seed)
