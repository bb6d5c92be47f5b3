"""dates: the weekday of a date, a date plus N days, the month N months after a month."""

from __future__ import annotations

import calendar
import datetime as dt
import random

from fedlora.data.tasks.registry import Record, clean, same_text, task, unique

FIRST, LAST = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
MONTHS = tuple(calendar.month_name[1:])
WEEKDAYS = tuple(calendar.day_name)


def random_date(rng: random.Random) -> dt.date:
    return FIRST + dt.timedelta(days=rng.randint(0, (LAST - FIRST).days))


def dates_example(rng: random.Random) -> Record:
    """One question of a kind drawn at random: weekday, add-days or month-after."""
    kind = rng.choice(("weekday", "add-days", "add-days", "month-after"))
    if kind == "weekday":
        day = random_date(rng)
        instruction = (f"What day of the week is {day.isoformat()}? "
                       f"Reply with the weekday only.")
        answer = WEEKDAYS[day.weekday()]
    elif kind == "add-days":
        day, days = random_date(rng), rng.randint(1, 30)
        instruction = (f"What date is {days} day{'s' * (days > 1)} after {day.isoformat()}? "
                       f"Reply with the date only, as YYYY-MM-DD.")
        answer = (day + dt.timedelta(days=days)).isoformat()
    else:
        month, months = rng.randrange(12), rng.randint(1, 11)
        instruction = (f"Which month comes {months} month{'s' * (months > 1)} after "
                       f"{MONTHS[month]}? Reply with the month only.")
        answer = MONTHS[(month + months) % 12]
    return {"instruction": instruction, "input": "", "output": answer, "task": "dates",
            "kind": kind}


def parse_date(text: str) -> dt.date | None:
    """A YYYY-MM-DD date (month and day may lack their leading zero), or None."""
    try:
        return dt.datetime.strptime(clean(text), "%Y-%m-%d").date()
    except ValueError:
        return None


def score(prediction: str, record: Record) -> bool:
    """Dates compare as dates (`2021-7-3` = `2021-07-03`); weekday and month names ignore case."""
    if record.get("kind") == "add-days":
        day = parse_date(prediction)
        return day is not None and day == parse_date(record["output"])
    return same_text(prediction, record["output"])


@task("dates", score)
def dates(n: int, seed: int) -> list[Record]:
    """Date reasoning over 1950-2049, distinct questions."""
    return unique(dates_example, n, seed)
