"""Generation-based exact-match accuracy: counting per family, pooling over clients, the
prompts it generates from, and distrust of counts a node reports."""

import math

import pytest

import fedlora.train.accuracy as accuracy_module
from fedlora.data import builtin_task
from fedlora.train.accuracy import OTHER, Accuracy, exact_match, scored_answers


def test_exact_match_counts_right_answers_per_family(monkeypatch, tiny_slot):
    records = builtin_task("suite", 12, seed=3)
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress):
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


def test_scored_answers_keep_question_expected_answer_and_the_verdict():
    records = builtin_task("arithmetic", 3, 0)
    answers = [records[0]["output"], "nonsense", f" {records[2]['output']} "]
    entries = scored_answers(records, answers, "builtin:arithmetic")
    assert [e["correct"] for e in entries] == [True, False, True]
    assert entries[1] == {"question": records[1]["instruction"],
                          "expected": records[1]["output"], "answer": "nonsense",
                          "correct": False, "family": "arithmetic"}


def test_the_experiment_keeps_every_scored_answer_with_its_score(tmp_path):
    """simulations.experiments.federation_helps.score: the results JSON of an arm holds its
    answers, and their verdicts add up to the accuracy it reports."""
    from fedlora.methods import load_settings
    from simulations.experiments.federation_helps import score

    settings = load_settings({"model": "tiny-llama", "device": "cpu", "max-new-tokens": 4,
                              "dataset": "builtin:arithmetic"})
    test = builtin_task("arithmetic", 5, 1)
    result = score(settings, None, test)
    assert result["adapter"] is None and len(result["answers"]) == 5
    assert [a["expected"] for a in result["answers"]] == [r["output"] for r in test]
    right = sum(a["correct"] for a in result["answers"])
    assert result["accuracy"] == right / 5



def test_exact_match_by_default_answers_only_records_that_name_their_scorer():
    """exact-match=auto: a built-in task's records (by the dataset's name or their task),
    BIG-bench targets and a record with a scorer field are answered; a user's open-ended
    record is not, unless exact-match=all."""
    from fedlora.data import score_answer
    from fedlora.train.accuracy import names_scorer, scored_records

    mine = [{"instruction": f"Write a poem about {w}.", "output": "..."} for w in "abc"]
    sums = builtin_task("arithmetic", 4, seed=1)
    bigbench = {"input": "2+2?", "output": "4", "targets": ["4", "four"], "task": "bb"}
    flagged = {"instruction": "Compute 2 + 3.", "output": "5", "scorer": "arithmetic"}
    assert scored_records(mine, "data.jsonl", "auto", 32) == []
    assert scored_records(mine, "data.jsonl", "all", 2) == mine[:2]
    assert scored_records(sums, "builtin:arithmetic", "auto", 3) == sums[:3]
    assert scored_records(sums, "data.jsonl", "auto", 32) == sums  # each record's own task
    assert scored_records([*mine, bigbench, flagged], "data.jsonl", "auto", 32) == [
        bigbench, flagged]
    assert scored_records(sums, "builtin:arithmetic", "auto", 0) == []
    assert not names_scorer(None, mine[0]) and names_scorer(None, flagged)
    assert score_answer("data.jsonl", " 5.0", flagged)  # the named scorer: numbers
    assert not score_answer("data.jsonl", " 5.0", {**flagged, "scorer": ""})  # equality
    with pytest.raises(ValueError, match="exact-match: expected one of auto, all, got 'some'"):
        scored_records(sums, None, "some", 3)


def test_sample_answers_keep_the_first_of_each_family_and_distrust_what_a_node_sends():
    from fedlora.train.accuracy import SAMPLE_CHARS, sample_answers, samples_columns, samples_of

    entries = [{"family": f, "question": f"q{i}", "expected": "1", "answer": "x" * 999,
                "correct": i % 2 == 0} for i, f in enumerate("aabaaab")]
    kept = sample_answers(entries, per_family=2)
    assert [(s["family"], s["question"]) for s in kept] == [("a", "q0"), ("a", "q1"),
                                                            ("b", "q2"), ("b", "q6")]
    assert len(kept[0]["answer"]) == SAMPLE_CHARS and kept[0]["correct"] is True
    columns = samples_columns(kept)
    assert samples_of(columns, 4) == [{**s, "partition-id": 4} for s in kept]
    assert samples_of(columns, 4, per_family=1) == [{**kept[0], "partition-id": 4},
                                                     {**kept[2], "partition-id": 4}]
    for broken in ({**columns, "answer": columns["answer"][:-1]},  # ragged
                   {**columns, "correct": [1, 0, 1, 0]},  # not booleans
                   {**columns, "question": [b"q0", "q1", "q2", "q6"]},  # not text
                   {k: v for k, v in columns.items() if k != "expected"}):  # a field missing
        assert samples_of(broken, 4) == []
