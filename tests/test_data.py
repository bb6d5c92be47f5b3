"""Data: response-only labels, JSONL records, IID partitions, the built-in task."""

import json
from collections import Counter

import pytest

from fedlora.config import DataSettings
from fedlora.data import (
    IGNORE,
    builtin_task,
    check_answers,
    client_records,
    collate,
    dirichlet_partition,
    iid_partition,
    load_jsonl,
    tokenize,
)
from fedlora.data.format import answer_tokens
from fedlora.models.builtin import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_labels_cover_exactly_the_answer_with_chat_template(tok):
    record = {"instruction": "Compute 2 + 3.", "input": "", "output": "5"}
    ex = tokenize(record, tok, 256)
    answer = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(answer) == "5<|im_end|>\n"
    prompt = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]
    assert tok.decode(prompt) == ("<|im_start|>user\nCompute 2 + 3.<|im_end|>\n"
                                  "<|im_start|>assistant\n")


def test_plain_template_without_chat_template(tok):
    plain = byte_tokenizer()
    plain.chat_template = None
    ex = tokenize({"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}, plain, 256)
    text = plain.decode(ex["input_ids"])
    assert text == "### Instruction:\nSay hi\n\nto Bob\n\n### Response:\nhi Bob<|im_end|>"
    answer = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert plain.decode(answer) == "hi Bob<|im_end|>"


def test_chat_messages_train_on_the_last_assistant_turn(tok):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}
    ex = tokenize(record, tok, 256)
    answer = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(answer) == "4<|im_end|>\n"


def test_left_truncation_keeps_the_answer_where_right_truncation_cuts_it_all(tok):
    record = {"instruction": "x" * 100, "output": "yes"}
    left, right = tokenize(record, tok, 16), tokenize(record, tok, 16, truncation="right")
    assert len(left["input_ids"]) == len(right["input_ids"]) == 16
    answer = [i for i, lab in zip(left["input_ids"], left["labels"]) if lab != IGNORE]
    assert tok.decode(answer).startswith("yes") and answer_tokens(left) == len(answer)
    assert answer_tokens(right) == 0
    # an answer longer than max-length keeps half of max-length of prompt, then is cut
    long = tokenize({"instruction": "x" * 100, "output": "y" * 100}, tok, 16)
    assert long["labels"][:8] == [IGNORE] * 8 and IGNORE not in long["labels"][8:]


def test_a_client_whose_answers_are_all_cut_is_refused_and_a_tenth_lost_is_a_warning(tok):
    kept = tokenize({"instruction": "q", "output": "a"}, tok, 64)
    lost = tokenize({"instruction": "x" * 100, "output": "a"}, tok, 16, truncation="right")
    with pytest.raises(ValueError, match="client 3: every one of its 2 training examples "
                                         "loses its whole answer at max-length=16"):
        check_answers([lost, lost], "client 3", 16, "right")
    assert "1 of 5 training examples" in check_answers([lost] + [kept] * 4, "c", 16, "right")
    assert check_answers([lost] + [kept] * 10, "c", 16, "right") is None


def test_truncation_and_collate_padding(tok):
    ex = tokenize({"instruction": "x" * 100, "output": "y"}, tok, 16)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 16
    batch = collate([ex, {"input_ids": [1, 2], "labels": [IGNORE, 2]}], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 14
    assert batch["labels"][1, 2:].eq(IGNORE).all()


def test_jsonl_loader_reads_both_forms_and_names_bad_fields(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}))
    assert len(load_jsonl(good)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected fields instruction/output.*"
                                         r"found \['answer', 'question'\]"):
        load_jsonl(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        load_jsonl(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_iid_partition_covers_everything_once_and_is_seeded():
    labels = [""] * 103
    parts = iid_partition(labels, 4, seed=7)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(103))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == iid_partition(labels, 4, seed=7) != iid_partition(labels, 4, seed=8)
    with pytest.raises(ValueError, match="cannot split 3 examples over 4 clients"):
        iid_partition([""] * 3, 4, seed=0)


def test_dirichlet_partition_covers_everything_and_skews_labels():
    labels = [f"t{i % 4}" for i in range(400)]
    parts = dirichlet_partition(labels, 4, seed=1, alpha=0.05)
    assert sorted(i for p in parts for i in p) == list(range(400))
    # tiny alpha: each client's largest label is nearly all of its data
    purity = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts]
    assert min(purity) > 0.8
    wide = dirichlet_partition(labels, 4, seed=1, alpha=1000.0)
    assert max(max(Counter(labels[i] for i in p).values()) / len(p) for p in wide) < 0.4
    assert parts == dirichlet_partition(labels, 4, seed=1, alpha=0.05)
    assert parts != dirichlet_partition(labels, 4, seed=2, alpha=0.05)


def test_dirichlet_split_of_records_names_a_missing_field():
    s = DataSettings(dataset_size=60, partitioner="dirichlet", partition_field="domain")
    with pytest.raises(ValueError, match="field 'domain'.*fields \\['input', 'instruction'"):
        client_records(s, 0, 2, seed=0)
    by_task = DataSettings(dataset_size=300, partitioner="dirichlet", dirichlet_alpha=0.05)
    train, _ = client_records(by_task, 0, 3, seed=0)
    assert max(Counter(r["task"] for r in train).values()) / len(train) > 0.7


def test_arithmetic_task_is_deterministic_and_correct():
    records = builtin_task("arithmetic", 50, seed=3)
    assert records == builtin_task("arithmetic", 50, seed=3)
    for r in records:
        expr = r["instruction"].split("Compute ")[1].split(".")[0]
        assert str(eval(expr)) == r["output"]
    with pytest.raises(ValueError, match="known: builtin:arithmetic"):
        builtin_task("nope", 1, 0)


def test_client_records_split_train_and_eval_without_overlap():
    s = DataSettings(dataset_size=100, eval_fraction=0.2)
    train0, eval0 = client_records(s, 0, 2, seed=0)
    train1, _ = client_records(s, 1, 2, seed=0)
    assert len(train0) + len(eval0) == 50 and len(eval0) == 10
    key = lambda r: r["instruction"] + r["output"]
    assert not {key(r) for r in eval0} & {key(r) for r in train0}


def test_node_data_path_overrides_the_dataset(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(10)))
    train, held = client_records(DataSettings(data_path=str(path), eval_fraction=0.2), 0, 1, 0)
    assert len(train) == 8 and len(held) == 2
    assert all(r["instruction"].startswith("q") for r in train + held)


def test_prompt_completion_records_are_scored_and_prompted_as_trained(tok):
    from fedlora.data.tasks.registry import exact
    from fedlora.train.accuracy import question_prompt

    raw = {"prompt": "2 + 2 =", "completion": " 4"}
    assert exact("4", raw) and not exact("5", raw)  # was a KeyError: 'messages'
    assert question_prompt(raw, tok) == "2 + 2 ="  # no chat template: training used none
    chat = {"instruction": "Compute 2 + 2.", "output": "4"}
    assert question_prompt(chat, tok).startswith("<|im_start|>")
    assert "Compute 2 + 2." in question_prompt(chat, tok) and exact("4", chat)
