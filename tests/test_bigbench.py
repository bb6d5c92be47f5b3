"""BIG-bench JSON tasks as a dataset source (`bigbench:<file or folder>`): prompts built as
BIG-bench builds them, task names, errors naming the field, scoring against any target, and
multiple choice by log-likelihood against a hand computation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fake_grid import run_inprocess

from fedlora.config import DataSettings
from fedlora.data import (
    by_field_partition,
    load_bigbench,
    load_records,
    load_source,
    partition_dataset,
    record_labels,
    score_answer,
    to_messages,
    train_eval_split,
)
from fedlora.data import source_version as data_source_version
from fedlora.inference import chat_prompt
from fedlora.models.builtin import byte_tokenizer
from fedlora.outputs import read_metrics
from fedlora.train.choices import (
    best_choice,
    choice_logliks,
    multiple_choice,
    pad_id,
    row_logliks,
    token_ids,
)

GENERATIVE = {
    "name": "plurals", "description": "plural of a noun", "metrics": ["exact_str_match"],
    "examples": [{"input": "cat", "target": "cats"},
                 {"input": "person", "target": ["people", "persons"]}],
}
CHOICE = {
    "name": "sport", "description": "plausible or not", "metrics": ["multiple_choice_grade"],
    "examples": [{"input": "He scored a touchdown", "target_scores": {"no": 0, "yes": 1}},
                 {"input": "Either way", "target_scores": {"a": 0.5, "b": 1, "c": 1}}],
}


def write(path, task) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))
    return str(path)


def test_generative_task_records_with_default_prefixes(tmp_path):
    records = load_bigbench(write(tmp_path / "plurals.json", GENERATIVE))
    assert records == [
        {"instruction": "Q: cat\nA:", "output": "cats", "task": "plurals", "targets": ["cats"]},
        {"instruction": "Q: person\nA:", "output": "people", "task": "plurals",
         "targets": ["people", "persons"]},
    ]
    # the prefix routes the same way through load_records and load_source
    spec = f"bigbench:{tmp_path / 'plurals.json'}"
    assert load_records(spec, 0, 0) == records == load_source(spec)


def test_multiple_choice_records_list_choices_in_file_order(tmp_path):
    records = load_bigbench(write(tmp_path / "sport.json", CHOICE))
    first, tie = records
    assert first["instruction"] == "Q: He scored a touchdown\n  choice: no\n  choice: yes\nA:"
    assert first["choices"] == ["no", "yes"] and first["target_scores"] == {"no": 0, "yes": 1}
    assert first["output"] == "yes" and first["targets"] == ["yes"]
    # equal highest scores are all targets; the completion is the first of them
    assert tie["choices"] == ["a", "b", "c"]
    assert tie["output"] == "b" and tie["targets"] == ["b", "c"]
    # append_choices_to_input false and a choice_prefix are honoured
    hidden = load_bigbench(write(tmp_path / "hidden.json",
                                 {**CHOICE, "append_choices_to_input": False}))
    assert hidden[0]["instruction"] == "Q: He scored a touchdown\nA:"
    listed = load_bigbench(write(tmp_path / "listed.json", {**CHOICE, "choice_prefix": " | "}))
    assert listed[0]["instruction"] == "Q: He scored a touchdown | no | yes\nA:"


def test_an_example_with_target_and_target_scores_accepts_both(tmp_path):
    task = {"name": "both", "examples": [
        {"input": "2+2", "target": "four", "target_scores": {"4": 1, "5": 0}}]}
    (record,) = load_bigbench(write(tmp_path / "both.json", task))
    assert record["output"] == "4" and record["targets"] == ["4", "four"]
    assert record["choices"] == ["4", "5"]


def test_task_prefix_and_custom_prefixes_make_the_chat_prompt(tmp_path):
    task = {**GENERATIVE, "task_prefix": "Give the plural.\n",
            "example_input_prefix": "\nNoun: ", "example_output_prefix": "\nPlural: "}
    record = load_bigbench(write(tmp_path / "p.json", task))[0]
    assert record["instruction"] == "Give the plural.\n\nNoun: cat\nPlural:"
    tokenizer = byte_tokenizer()
    prompt = chat_prompt(to_messages(record)[:-1], tokenizer)
    assert prompt == ("<|im_start|>user\nGive the plural.\n\nNoun: cat\nPlural:<|im_end|>\n"
                      "<|im_start|>assistant\n")
    # empty prefixes: input and answer run together as in the raw BIG-bench text
    bare = load_bigbench(write(tmp_path / "bare.json", {
        **GENERATIVE, "example_input_prefix": "", "example_output_prefix": " "}))
    assert bare[0]["instruction"] == "cat"


def test_folder_gives_one_task_name_per_task_in_path_order(tmp_path):
    root = tmp_path / "benchmark_tasks"
    write(root / "plurals" / "task.json", {**GENERATIVE, "name": "ignored for task.json"})
    write(root / "arith" / "task.json", {"name": "arith", "description": "has subtasks"})
    write(root / "arith" / "add" / "task.json",
          {"name": "add", "examples": [{"input": "1+1", "target": "2"}]})
    write(root / "arith" / "results" / "scores.json", {"scores": [1, 2]})  # not a task
    write(root / "zz_sport.json", CHOICE)
    (root / "README.md").write_text("not json")
    records = load_records(f"bigbench:{root}", 0, 0)
    assert [r["task"] for r in records] == ["arith/add", "plurals", "plurals", "sport", "sport"]
    # a single subtask file keeps its <task>/<subtask> name
    assert load_bigbench(str(root / "arith" / "add" / "task.json"))[0]["task"] == "arith/add"


def test_tasks_sharing_a_name_are_named_by_their_path(tmp_path):
    write(tmp_path / "v1" / "plurals.json", GENERATIVE)
    write(tmp_path / "v2" / "plurals.json", GENERATIVE)
    write(tmp_path / "sport.json", CHOICE)
    tasks = {r["task"] for r in load_bigbench(str(tmp_path))}
    assert tasks == {"v1/plurals", "v2/plurals", "sport"}


def test_source_task_field_names_a_task_exported_from_bigbench(tmp_path):
    task = {**GENERATIVE, "name": "subtask_1", "source_task": "periodic_elements/subtask_1"}
    records = load_bigbench(write(tmp_path / "periodic_elements__subtask_1.json", task))
    assert {r["task"] for r in records} == {"periodic_elements/subtask_1"}


def test_by_field_partition_gives_one_task_per_client(tmp_path):
    write(tmp_path / "a" / "task.json", GENERATIVE)
    write(tmp_path / "b" / "task.json", {**CHOICE, "examples": CHOICE["examples"] * 3})
    settings = DataSettings(dataset=f"bigbench:{tmp_path}", partitioner="by-field",
                            partition_field="task", eval_fraction=0.0)
    records, parts = partition_dataset(settings, 2, seed=0)
    assert [sorted({records[i]["task"] for i in part}) for part in parts] == [["a"], ["b"]]
    assert [len(part) for part in parts] == [2, 6]
    labels = record_labels(records, "task", "by-field")
    assert by_field_partition(labels, 2, seed=0) == parts
    train, held = train_eval_split([records[i] for i in parts[1]], 0.5, seed=0)
    assert len(train) == 3 and len(held) == 3


def test_source_version_follows_the_task_files(tmp_path):
    path = tmp_path / "t" / "task.json"
    write(path, GENERATIVE)
    before = data_source_version(f"bigbench:{tmp_path}")
    assert any(str(path) in str(part) for part in before)
    # the same file read as plain records is another source
    assert data_source_version(f"bigbench:{path}") != data_source_version(str(path))
    write(path, {**GENERATIVE, "examples": GENERATIVE["examples"][:1]})
    assert data_source_version(f"bigbench:{tmp_path}") != before


@pytest.mark.parametrize("task,message", [
    ({"name": "t"}, "task.json: expected 'examples', a non-empty list of {input, target or "
                    "target_scores}; found fields ['name']"),
    ({"name": "t", "examples": []}, "task.json: expected 'examples', a non-empty list"),
    ({"name": "t", "examples": [{"input": "a", "target": "b"}, {"input": "c"}]},
     "task.json: examples[1]: expected 'target' or 'target_scores', found fields ['input']"),
    ({"name": "t", "examples": [{"target": "b"}]},
     "task.json: examples[0]: expected 'input', found fields ['target']"),
    ({"name": "t", "examples": [{"input": "a", "target_scores": ["x", "y"]}]},
     "task.json: examples[0]: field 'target_scores' must be a non-empty object "
     "{choice: number score}, got ['x', 'y']"),
    ({"name": "t", "examples": [{"input": "a", "target_scores": {"x": "1", "y": 0}}]},
     "task.json: examples[0]: field 'target_scores' must be a non-empty object"),
    ({"name": "t", "examples": [{"input": "a", "target": []}]},
     "task.json: examples[0]: field 'target' is an empty list"),
    ({"name": "t", "examples": [{"input": "a", "target": {"x": 1}}]},
     "task.json: examples[0]: field 'target' must be a string or a list of strings"),
    ({"name": "t", "examples": ["a"]},
     "task.json: examples[0]: expected an object {input, target or target_scores}, got a "
     "JSON str"),
    ({"name": "t", "task_prefix": 3, "examples": [{"input": "a", "target": "b"}]},
     "task.json: field 'task_prefix' must be text, got 3"),
    ({"name": "t", "append_choices_to_input": "no",
      "examples": [{"input": "a", "target": "b"}]},
     "task.json: field 'append_choices_to_input' must be true or false"),
])
def test_malformed_tasks_name_the_file_example_and_field(tmp_path, task, message):
    path = write(tmp_path / "t" / "task.json", task)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_bigbench(path)
    assert str(err.value).startswith(path)


def test_missing_paths_broken_json_and_folders_without_tasks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing does not exist; pass bigbench:<file "
                                                r"or folder>: a BIG-bench task\.json"):
        load_records(f"bigbench:{tmp_path / 'missing'}", 0, 0)
    with pytest.raises(FileNotFoundError, match="names no file or folder"):
        load_bigbench("")
    (tmp_path / "notes.json").write_text(json.dumps({"data": [1]}))
    with pytest.raises(ValueError, match=r"no BIG-bench task in this folder or below it"):
        load_bigbench(str(tmp_path))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"list.json: expected a BIG-bench task, an object with "
                                         r"'examples'.*got a JSON list"):
        load_bigbench(str(tmp_path / "list.json"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "task.json").write_text('{"examples": [')
    with pytest.raises(ValueError, match=r"task.json: not valid JSON"):
        load_bigbench(str(tmp_path))


def test_a_task_file_without_the_prefix_is_pointed_to_it(tmp_path):
    path = write(tmp_path / "task.json", {**GENERATIVE, "keywords": ["x"]})
    with pytest.raises(ValueError, match=re.escape(f"(a BIG-bench task? pass bigbench:{path})")):
        load_source(path)


def test_score_answer_accepts_any_listed_target(tmp_path):
    record = load_bigbench(write(tmp_path / "p.json", GENERATIVE))[1]
    assert score_answer(None, "people", record)
    assert score_answer("bigbench:p.json", " persons.\nmore text", record)
    assert not score_answer(None, "peoples", record)
    assert not score_answer(None, "People", record)  # exact match is case-sensitive
    # records without targets: only the output, as before
    plain = {"instruction": "q", "output": "people"}
    assert score_answer(None, "people", plain) and not score_answer(None, "persons", plain)


# ---- multiple choice by log-likelihood ----

@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def hand_loglik(model, tokenizer, prompt: str, choice: str) -> float:
    """One plain forward pass over prompt + choice: the choice tokens' log-softmax, summed."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logprobs[len(p) + j - 1, token]) for j, token in enumerate(c))


def test_choice_logliks_equal_a_hand_computation(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = chat_prompt([{"role": "user", "content": "Q: Is it valid?\nA:"}], tokenizer)
    choices = ["Valid", "Invalid", "no", "maybe so"]  # different lengths: padded in a batch
    expected = [hand_loglik(model, tokenizer, prompt, c) for c in choices]
    for batch_size in (1, 3, 16):
        got = choice_logliks(model, tokenizer, prompt, choices, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-5)
    assert best_choice(choice_logliks(model, tokenizer, prompt, choices)) == \
        max(range(len(expected)), key=expected.__getitem__)
    assert all(p.grad is None for p in model.parameters())


def test_choice_logliks_without_logits_to_keep(tiny_lm):
    model, tokenizer = tiny_lm

    class Plain(torch.nn.Module):  # a model whose forward knows only ids and mask
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    prompt = "Q: 1+1?\nA: "
    choices = ["2", "11", "two"]
    expected = [hand_loglik(model, tokenizer, prompt, c) for c in choices]
    assert choice_logliks(Plain(), tokenizer, prompt, choices) == pytest.approx(expected,
                                                                                 abs=1e-5)


def test_one_token_choices_of_a_prompt_share_one_forward_pass(tiny_lm):
    """MMLU's option letters: each prompt is run once and its last position scores every
    one-token choice; longer choices still get their own rows. Equal to the hand computation
    with and without logits_to_keep, prompts of different lengths in one batch."""
    model, tokenizer = tiny_lm
    letters = [token_ids(tokenizer, c) for c in ("A", "B", "C", "D")]
    assert all(len(ids) == 1 for ids in letters)
    prompts = [token_ids(tokenizer, text) for text in ("Q: 1+1?\nA:", "Pick one", "Q: the "
                                                       "longest of these prompts?\nA:")]
    long_choice = token_ids(tokenizer, "maybe so")
    rows = [(p, c) for p in prompts for c in letters] + [(prompts[0], long_choice)]

    class Counting(torch.nn.Module):  # counts forward passes; optionally no logits_to_keep
        def __init__(self, keep: bool):
            super().__init__()
            self.inner, self.calls, self.keep = model, 0, keep

        def forward(self, input_ids, attention_mask=None, **kwargs):
            self.calls += 1
            kwargs = kwargs if self.keep else {}
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    expected = [hand_loglik(model, tokenizer, tokenizer.decode(p), tokenizer.decode(c))
                for p, c in rows]
    for keep in (True, False):
        counting = Counting(keep)
        got = row_logliks(counting, rows, pad_id(tokenizer), batch_size=16)
        assert got == pytest.approx(expected, abs=1e-5)
        assert counting.calls == 2  # the three prompts together, then the one longer choice


def test_best_choice_takes_the_first_maximum():
    assert best_choice([-3.0, -1.0, -1.0, -2.0]) == 1
    with pytest.raises(ValueError, match="no choices"):
        best_choice([])


def test_multiple_choice_counts_per_task(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    (base,) = load_bigbench(write(tmp_path / "s.json", {**CHOICE, "examples": [
        {"input": "He scored a touchdown", "target_scores": {"no": 0, "yes": 1, "maybe": 0}}]}))
    prompt = chat_prompt(to_messages(base)[:-1], tokenizer)
    expected = [hand_loglik(model, tokenizer, prompt, c) for c in base["choices"]]
    likeliest = base["choices"][max(range(3), key=expected.__getitem__)]
    other = next(c for c in base["choices"] if c != likeliest)
    choices = base["choices"]
    right = {**base, "task": "a", "target_scores": {c: int(c == likeliest) for c in choices}}
    wrong = {**base, "task": "a", "target_scores": {c: int(c == other) for c in choices}}
    tie = {**base, "task": "b", "target_scores": {c: 1 for c in choices}}
    generative = {"instruction": "q", "output": "x", "task": "c", "targets": ["x"]}
    acc = multiple_choice(model, tokenizer, [right, wrong, generative, tie], batch_size=2)
    assert acc.total == {"a": 2, "b": 1} and acc.correct == {"a": 1, "b": 1}
    assert acc.metrics() == {"choice-accuracy": 2 / 3, "choice-accuracy/a": 0.5,
                             "choice-accuracy/b": 1.0}


def test_choice_logliks_of_an_adapter_model_keep_its_training_mode(tiny_slot):
    model, tokenizer = tiny_slot.model, tiny_slot.tokenizer  # a PEFT model, in training mode
    prompt = chat_prompt([{"role": "user", "content": "Pick one."}], tokenizer)
    choices = ["left", "right"]
    model.eval()
    expected = [hand_loglik(model, tokenizer, prompt, c) for c in choices]
    model.train()
    assert choice_logliks(model, tokenizer, prompt, choices) == pytest.approx(expected, abs=1e-5)
    assert model.training


def test_a_federated_round_on_two_bigbench_tasks_reports_both_accuracies(tmp_path):
    """One BIG-bench task per client (by-field over `task`) through the real ServerApp and
    ClientApp: generated exact match per task, and the multiple-choice task also by its most
    likely choice (choice-accuracy), pooled by the server, at round 0 and after training."""
    folder = tmp_path / "tasks"
    words = ["cat", "dog", "pen", "cup", "hat", "box", "car", "bus", "map", "key"]
    write(folder / "plurals.json", {**GENERATIVE, "examples": [
        {"input": w, "target": w + "s"} for w in words * 3]})
    write(folder / "sport.json", {**CHOICE, "examples": [
        {"input": f"{w} scored a goal", "target_scores": {"yes": 1, "no": 0}}
        for w in words * 3]})
    run_inprocess({"model": "tiny-llama", "device": "cpu", "dataset": f"bigbench:{folder}",
                   "partitioner": "by-field", "partition-field": "task", "eval-fraction": 0.3,
                   "local-steps": 1, "num-server-rounds": 1, "eval-accuracy": 4,
                   "max-new-tokens": 4, "min-available-nodes": 2,
                   "output-dir": str(tmp_path / "out")}, 2)
    for row in read_metrics(tmp_path / "out"):  # round 0 and round 1
        assert set(row["client-accuracy"]) == {"0", "1"}
        assert {k for k in row if k.startswith("accuracy/")} == {"accuracy/plurals",
                                                                 "accuracy/sport"}
        assert 0 <= row["choice-accuracy"] <= 1 and "choice-accuracy/sport" in row
        assert len(row["client-choice-accuracy"]) == 1  # only the sport client has choices


def test_a_node_may_hold_a_bigbench_task_as_its_own_data(tmp_path, monkeypatch):
    """`fedlora client --data-path bigbench:<file>`: the node config keeps the prefix with an
    absolute path, and the node's records are that task's; a missing task is refused."""
    import argparse

    from fedlora.cli.client import add_arguments, node_config
    from fedlora.data import client_records

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    write(tmp_path / "plurals.json", GENERATIVE)
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["--server", "127.0.0.1:9092", "--insecure",
                              "--data-path", "bigbench:plurals.json"])
    config = node_config(args)
    assert config["data-path"] == f"bigbench:{tmp_path / 'plurals.json'}"
    train, held_out = client_records(DataSettings(data_path=config["data-path"],
                                                  eval_fraction=0.5), 0, 1, 0)
    assert sorted(r["output"] for r in train + held_out) == ["cats", "people"]
    missing = parser.parse_args(["--server", "127.0.0.1:9092", "--insecure",
                                 "--data-path", "bigbench:nowhere.json"])
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        node_config(missing)
