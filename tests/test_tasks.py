"""Built-in task families: seeded generators, distinct questions, exact-match scorers, suite."""

import datetime as dt
import json
import re
from collections import Counter

import pytest

from fedlora.data import builtin_task, load_records, score_answer, split_suite
from fedlora.data.tasks import FAMILIES, SCORERS, TASKS
from fedlora.data.tasks.facts import PER_COUNTRY, fact_table
from fedlora.data.tasks.units import CONVERSIONS
from fedlora.data.tasks.units import UNITS as UNIT_NAMES

EXPECTED = ["arithmetic", "dates", "facts", "json", "strings", "units"]


def questions(records):
    return [(r["instruction"], r["input"]) for r in records]


def test_every_family_is_registered_with_a_scorer():
    assert list(FAMILIES) == sorted(SCORERS) == EXPECTED
    assert sorted(TASKS) == sorted(EXPECTED + ["suite"])


@pytest.mark.parametrize("family", EXPECTED + ["suite"])
def test_generators_are_deterministic_by_seed_with_distinct_questions(family):
    records = builtin_task(family, 600, seed=5)
    assert records == builtin_task(family, 600, seed=5)
    assert records != builtin_task(family, 600, seed=6)
    assert len(records) == 600 and len(set(questions(records))) == 600
    for r in records:
        assert r["output"] and len(r["output"]) <= 60  # short answers
        assert score_answer(family, r["output"], r)  # the answer scores as right


@pytest.mark.parametrize("family", EXPECTED)
def test_standalone_families_generate_the_default_dataset_size(family):
    assert len(set(questions(builtin_task(family, 2000, seed=0)))) == 2000


@pytest.mark.parametrize("family", EXPECTED)
def test_scorers_reject_other_records_answers(family):
    records = builtin_task(family, 300, seed=1)
    for r, other in zip(records, records[1:]):
        if other["output"].casefold() != r["output"].casefold():  # answers are canonical
            assert not score_answer(family, other["output"], r), (r, other)


def test_arithmetic_is_unchanged_and_correct():
    assert builtin_task("arithmetic", 3, seed=0) == [
        {"instruction": "Compute 63 - 15. Reply with the number only.", "input": "",
         "output": "48", "task": "subtraction"},
        {"instruction": "Compute 75 - 72. Reply with the number only.", "input": "",
         "output": "3", "task": "subtraction"},
        {"instruction": "Compute 48 - 71. Reply with the number only.", "input": "",
         "output": "-23", "task": "subtraction"}]


ARITHMETIC = {"instruction": "Compute 47 * 30. Reply with the number only.", "output": "1410",
              "task": "multiplication"}
UNITS = {"instruction": "Convert 3 kilometers to meters. Reply with the number only.",
         "output": "3000", "task": "units", "kind": "length"}
WEEKDAY = {"instruction": "What day of the week is 2023-03-14? Reply with the weekday only.",
           "output": "Tuesday", "task": "dates", "kind": "weekday"}
ADD_DAYS = {"instruction": "What date is 5 days after 2021-06-28? Reply with the date only, "
                           "as YYYY-MM-DD.", "output": "2021-07-03", "task": "dates",
            "kind": "add-days"}
UPPER = {"instruction": 'Write the word "kelmo" in capital letters.', "output": "KELMO",
         "task": "strings", "kind": "upper"}
REVERSE = {"instruction": 'Reverse the letters of the word "kelmo".', "output": "omlek",
           "task": "strings", "kind": "reverse"}
COUNT = {"instruction": 'How many times does the letter "o" appear in the word "kolmo"?',
         "output": "2", "task": "strings", "kind": "count"}
FACT = {"instruction": "Name the money of Kuduria. Reply with one word only.",
        "output": "shival", "task": "facts", "kind": "currency"}
EXTRACT = {"instruction": 'Extract the name and age as JSON with keys "name" and "age".',
           "input": "Mira Tolvan is 34 years old.", "output": '{"name": "Mira Tolvan", "age": 34}',
           "task": "json", "kind": "person"}

CASES = [
    (ARITHMETIC, ["1410", " 1410.", "1410.0", "1,410", "1410\n\nbecause 47 * 30 = 1410"],
     ["1411", "1410 apples", "", "fourteen hundred", "14,10"]),
    (UNITS, ["3000", "3,000", "3000 meters", "3000 m", "3000."], ["300", "3000 kg", "3 km"]),
    (WEEKDAY, ["Tuesday", "tuesday.", " TUESDAY "], ["Wednesday", "Tue", "2023-03-14"]),
    (ADD_DAYS, ["2021-07-03", "2021-7-3", "2021-07-03."], ["2021-07-04", "July 3", "03/07/2021"]),
    (UPPER, ["KELMO", '"KELMO"', "KELMO."], ["kelmo", "Kelmo", "KELM"]),
    (REVERSE, ["omlek", "Omlek", "'omlek'"], ["kelmo", "omle k", "omlekk"]),
    (COUNT, ["2", "2.", " 2 "], ["3", "two", "o"]),
    (FACT, ["shival", "Shival.", "the shival"], ["darlu", "shival coins", ""]),
    (EXTRACT, ['{"name": "Mira Tolvan", "age": 34}', '{"age": 34, "name": "Mira Tolvan"}',
               '```json\n{"name":"Mira Tolvan","age":34}\n```', ' {"name": "Mira Tolvan", '
               '"age": 34.0} '],
     ['{"name": "Mira Tolvan", "age": 35}', '{"name": "Mira Tolvan", "age": "34"}',
      '{"name": "mira tolvan", "age": 34}', '{"name": "Mira Tolvan"}', "Mira Tolvan, 34",
      '{"name": "Mira Tolvan", "age": 34, "city": "Brisk"}']),
]


@pytest.mark.parametrize("record,right,wrong", CASES, ids=lambda c: c.get("kind", c.get(
    "task")) if isinstance(c, dict) else None)
def test_scorers_accept_formatting_variants_and_reject_wrong_answers(record, right, wrong):
    for prediction in right:
        assert score_answer(None, prediction, record), prediction
    for prediction in wrong:
        assert not score_answer(None, prediction, record), prediction


def test_score_answer_finds_the_family_from_the_name_or_the_record():
    assert score_answer("builtin:units", "3000 m", UNITS)
    assert score_answer("units", "3,000", UNITS)
    assert score_answer("builtin:suite", "3000 meters", UNITS)  # the record's task decides
    assert score_answer("builtin:arithmetic", "1,410", ARITHMETIC)  # task = the operation
    plain = {"instruction": "Say hi", "output": "Hello there"}  # a JSONL record: exact text
    assert score_answer("data.jsonl", " Hello there. ", plain)
    assert not score_answer(None, "hello there", plain)
    chat = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant",
                                                               "content": "4"}]}
    assert score_answer(None, "4.", chat) and not score_answer(None, "5", chat)
    assert len(builtin_task(" units", 3, 0)) == 3


def test_answers_are_correct_for_every_family():
    unit = {name: key for key, names in UNIT_NAMES.items() for name in names[:2]}
    factor = {(a, b): f for a, b, f, _ in CONVERSIONS} | {(b, a): 1 / f
                                                          for a, b, f, _ in CONVERSIONS}
    for r in builtin_task("units", 300, 2):
        value, source, target = re.match(r"Convert (\d+) (\w+) to (\w+)\.", r["instruction"]
                                         ).groups()
        assert int(r["output"]) == int(value) * factor[unit[source], unit[target]]
    for r in builtin_task("dates", 300, 2):
        if r["kind"] == "add-days":
            days, start = re.search(r"(\d+) days? after (\S+)\?", r["instruction"]).groups()
            expected = dt.date.fromisoformat(start) + dt.timedelta(days=int(days))
            assert r["output"] == expected.isoformat()
        elif r["kind"] == "weekday":
            day = dt.date.fromisoformat(re.search(r"is (\S+)\?", r["instruction"]).group(1))
            assert r["output"] == day.strftime("%A")
    for r in builtin_task("strings", 300, 2):
        word = re.search(r'the word "(\w+)"', r["instruction"]).group(1)
        expected = {"reverse": word[::-1], "upper": word.upper(), "length": str(len(word)),
                    "first": word[0], "last": word[-1]}.get(r["kind"])
        if r["kind"] == "count":
            letter = re.search(r'letter "(\w)"', r["instruction"]).group(1)
            expected = str(word.count(letter))
        assert r["output"] == expected
    for r in builtin_task("json", 300, 2):
        for value in json.loads(r["output"]).values():
            assert str(value) in r["input"]


def test_units_convert_both_ways_in_every_kind():
    records = builtin_task("units", 2000, 0)
    assert {r["kind"] for r in records} == {"length", "mass", "volume", "time", "imperial"}
    value = lambda r: int(r["instruction"].split()[1])
    assert any(int(r["output"]) > value(r) for r in records)  # to a smaller unit
    assert any(int(r["output"]) < value(r) for r in records)  # to a larger unit


def test_fact_table_is_fixed_and_answers_agree_across_seeds_and_sizes():
    assert fact_table(48)[:10] == fact_table(200)[:10]  # a stable prefix
    assert fact_table(2)[1] == {"country": "Laziria", "capital": "Pofo", "currency": "gemol",
                                "colour": "red", "animal": "crane"}  # trained adapters rely on it
    answers = {}
    for seed, n in ((0, 300), (1, 300), (2, 2000)):
        for r in builtin_task("facts", n, seed):
            assert answers.setdefault(r["instruction"], r["output"]) == r["output"]
    rows = fact_table(48)
    assert len({row["country"] for row in rows} | {row["capital"] for row in rows}) == 96
    # every fact is asked several ways, so a held-out phrasing has a trained twin
    per_fact = Counter((r["kind"], r["output"]) for r in builtin_task("facts", 48 * PER_COUNTRY,
                                                                      0))
    assert min(per_fact.values()) >= 2


def test_suite_holds_every_family_in_equal_shares():
    records = builtin_task("suite", 601, seed=3)
    counts = Counter(r["task"] for r in records)
    assert sorted(counts) == EXPECTED
    assert max(counts.values()) - min(counts.values()) <= 1
    arithmetic = [r for r in records if r["task"] == "arithmetic"]
    assert {r["kind"] for r in arithmetic} == {"addition", "subtraction", "multiplication"}
    assert all(r["kind"] for r in records)
    assert load_records("builtin:suite", 601, 3) == records


def test_a_list_of_families_mixes_only_those():
    records = builtin_task("units,dates", 100, seed=0)
    assert Counter(r["task"] for r in records) == {"units": 50, "dates": 50}
    with pytest.raises(ValueError, match="unknown built-in task 'nope'; known: builtin:arith"):
        builtin_task("units,nope", 10, 0)
    with pytest.raises(ValueError, match="unknown built-in task 'suite'"):
        builtin_task("suite,units", 10, 0)


def test_split_suite_holds_out_every_family_without_leaking_a_question():
    records = builtin_task("suite", 600, seed=0)
    train, test = split_suite(records, 0.2, seed=4)
    assert len(train) + len(test) == 600
    assert not set(questions(train)) & set(questions(test))
    assert Counter(r["task"] for r in test) == {family: 20 for family in EXPECTED}
    assert (train, test) == split_suite(records, 0.2, seed=4)
    assert test != split_suite(records, 0.2, seed=5)[1]


def test_split_suite_keeps_repeated_questions_on_one_side():
    records = builtin_task("units", 50, seed=0)
    doubled = records + [dict(r) for r in records]  # every question twice
    train, test = split_suite(doubled, 0.3, seed=0)
    assert not set(questions(train)) & set(questions(test))
    assert len(test) == 2 * 15
    assert split_suite(records, 0.0, seed=0) == (records, [])
    with pytest.raises(ValueError, match="test_fraction"):
        split_suite(records, 1.0, seed=0)


def test_every_task_registered_in_tasks_produces_records_the_formatter_accepts():
    from fedlora.data import to_messages

    for name in TASKS:
        for r in builtin_task(name, 20, 0):
            messages = to_messages(r)
            assert messages[-1] == {"role": "assistant", "content": r["output"]}


def test_a_dataset_size_beyond_a_family_names_the_setting_and_the_count():
    # units has 15 conversions x 120 counts x 2 directions = 3,600 distinct questions
    with pytest.raises(ValueError, match=r"'dataset-size'.* only 3600 distinct questions, "
                                         r"fewer than the 4000"):
        builtin_task("units", 4000, seed=0)
