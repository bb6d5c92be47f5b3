"""Generation-based exact-match accuracy: counting per family, pooling over clients, the
prompts it generates from, and distrust of counts a node reports."""

import math

import pytest

import fedlora.train.accuracy as accuracy_module
from fedlora.data import builtin_task
from fedlora.train.accuracy import OTHER, Accuracy, exact_match


def test_exact_match_counts_right_answers_per_family(monkeypatch, tiny_slot):
    records = builtin_task("suite", 12, seed=3)
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        seen["prompts"] = prompts
        # the right answer for even records, a wrong one for odd records
        return [r["output"] if i % 2 == 0 else "no idea" for i, r in enumerate(records)]

    monkeypatch.setattr(accuracy_module, "generate", fake_generate)
    acc, answers = exact_match(tiny_slot.model, tiny_slot.tokenizer, records, "builtin:suite")
    assert answers[1] == "no idea"
    assert acc.total == {f: 2 for f in ("arithmetic", "dates", "facts", "json", "strings",
                                        "units")}
    assert sum(acc.correct.values()) == 6 and acc.overall == 0.5
    # the prompt is the question without its answer, formatted as in training
    assert all(r["output"] not in p[-len(r["output"]) - 2:]
               for r, p in zip(records, seen["prompts"]))
    assert records[0]["instruction"] in seen["prompts"][0]


def test_metrics_pool_counts_not_client_means():
    a, b = Accuracy(), Accuracy()
    for right in (True, True, True, False):  # client a: 3 / 4 units
        a.add("units", right)
    b.add("units", False)  # client b: 0 / 1 units, 1 / 1 dates
    b.add("dates", True)
    pooled = a.merge(b)
    assert pooled.metrics() == {"accuracy": 4 / 6, "accuracy/dates": 1.0,
                                "accuracy/units": 3 / 5}
    assert Accuracy.from_counts(pooled.counts()) == pooled


def test_data_without_families_reports_only_overall_accuracy():
    acc = Accuracy()
    acc.add(OTHER, True)
    acc.add(OTHER, False)
    assert acc.metrics() == {"accuracy": 0.5}
    assert math.isnan(Accuracy().overall)


@pytest.mark.parametrize("counts", [
    {"total/units": 3, "correct/units": 4},  # more right than asked
    {"total/units": -1, "correct/units": 0},
    {"total/units": 0, "correct/units": 0},
    {"total/units": 2.5, "correct/units": 1},
    {"total/units": 10**9, "correct/units": 1},
])
def test_inconsistent_counts_from_a_node_are_ignored(counts):
    assert Accuracy.from_counts(counts).total == {}


def test_choice_counts_travel_apart_from_exact_match_counts():
    generated = Accuracy()
    generated.add("plurals", True)
    choice = Accuracy(kind="choice")
    choice.add("sport", True)
    choice.add("sport", False)
    row = {**generated.counts(), **choice.counts()}
    assert row == {"correct/plurals": 1, "total/plurals": 1, "choice-correct/sport": 1,
                   "choice-total/sport": 2}
    assert Accuracy.from_counts(row).metrics() == {"accuracy": 1.0, "accuracy/plurals": 1.0}
    assert Accuracy.from_counts(row, "choice").metrics() == {"choice-accuracy": 0.5,
                                                            "choice-accuracy/sport": 0.5}
