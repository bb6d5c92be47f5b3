"""Loaders: every file format and record form, field maps, clear errors; formatting and packing."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fedlora.config import DataSettings, SettingsError
from fedlora.data import IGNORE, client_records, load_source, pack, tokenize, tokenize_records
from fedlora.models.builtin import byte_tokenizer

ALPACA = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
          for i in range(5)]


@pytest.fixture(scope="module")
def tok():
    """The tiny-llama tokenizer: byte-level, ChatML chat template, EOS <|im_end|>."""
    return byte_tokenizer()


@pytest.fixture(scope="module")
def plain():
    """The same tokenizer without a chat template."""
    t = byte_tokenizer()
    t.chat_template = None
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, delimiter=","):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved(path, rows, split=None):
    import datasets

    data = datasets.Dataset.from_list(rows)
    if split:
        data = datasets.DatasetDict({split: data, "other": datasets.Dataset.from_list(rows[:1])})
    data.save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda d, rows: write_jsonl(d / "d.jsonl", rows),
    "json-list": lambda d, rows: (d / "d.json").write_text(json.dumps(rows)) and d / "d.json",
    "json-wrapped": lambda d, rows: ((d / "d.json").write_text(json.dumps({"version": 1,
                                                                           "data": rows}))
                                     and d / "d.json"),
    "json-lines-named-json": lambda d, rows: write_jsonl(d / "d.json", rows),
    "csv": lambda d, rows: write_csv(d / "d.csv", rows),
    "tsv": lambda d, rows: write_csv(d / "d.tsv", rows, "\t"),
    "parquet": lambda d, rows: write_parquet(d / "d.parquet", rows),
    "save_to_disk-dataset": lambda d, rows: write_saved(d / "saved", rows),
    "save_to_disk-datasetdict": lambda d, rows: write_saved(d / "saved", rows, split="train"),
}


# ---- formats ----

@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_gives_the_same_records(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, ALPACA)
    assert load_source(str(path)) == ALPACA


def test_a_table_mixing_record_forms_reads_nulls_as_absent(tmp_path):
    rows = [{"instruction": "a", "output": "b", "messages": None},
            {"instruction": None, "output": None,
             "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]
    first, second = load_source(str(write_parquet(tmp_path / "mixed.parquet", rows)))
    assert first == {"instruction": "a", "input": "", "output": "b"}
    assert second == {"messages": rows[1]["messages"]}


def test_datasetdict_folder_reads_the_configured_split(tmp_path):
    path = write_saved(tmp_path / "saved", ALPACA, split="train")
    assert load_source(str(path), split="other") == ALPACA[:1]
    with pytest.raises(ValueError, match=r"holds the splits \['other', 'train'\], not 'test'; "
                                         r"set data-split"):
        load_source(str(path), split="test")


def test_nested_messages_survive_parquet_and_save_to_disk(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}], "site": "a"}]
    for path in (write_parquet(tmp_path / "m.parquet", rows), write_saved(tmp_path / "m", rows)):
        assert load_source(str(path)) == rows


def test_json_object_with_two_lists_is_refused(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": ALPACA, "test": ALPACA}))
    with pytest.raises(ValueError, match=r"two.json: expected a list of records or an object "
                                         r"with one list field.*\['train', 'test'\]"):
        load_source(str(path))


@pytest.mark.parametrize("name,text", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.json", ""),
                                       ("e.csv", "instruction,output\n"), ("f.csv", "")])
def test_empty_files_say_they_hold_no_records(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{name} holds no records; expected records with "
                                         f"fields instruction/output"):
        load_source(str(path))


def test_empty_parquet_holds_no_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="e.parquet holds no records"):
        load_source(str(path))


def test_missing_file_unknown_extension_and_plain_folder_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.csv does not exist; pass a \.jsonl, "
                                                r"\.json, \.csv, \.tsv or \.parquet file"):
        load_source(str(tmp_path / "missing.csv"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: cannot read \.txt files; pass a \.jsonl"):
        load_source(str(tmp_path / "notes.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder is a folder but not one written by datasets' "
                                         "save_to_disk"):
        load_source(str(tmp_path / "folder"))


def test_broken_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        load_source(str(path))
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_source(str(tmp_path / "broken.json"))


# ---- the hub ----

def test_hub_id_offline_fails_with_what_to_do():
    """A real datasets.load_dataset call in a fresh process with the hub switched off."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = ("from fedlora.data import load_source\n"
            "try:\n    load_source('hf:someone/not-cached-anywhere')\n"
            "except ConnectionError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert ("could not reach the Hugging Face hub for dataset someone/not-cached-anywhere; "
            "download it where you are online") in out.stdout, out.stderr[-2000:]
    assert "pass the save_to_disk folder or a file" in out.stdout


def test_hub_id_passes_config_and_split_and_maps_fields(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"q": "2+2?", "a": "4"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = load_source("hf:org/math:easy", {"prompt": "q", "completion": "a"}, "test")
    assert calls == [("org/math", "easy", "test")]
    assert records == [{"q": "2+2?", "a": "4", "prompt": "2+2?", "completion": "4"}]


def test_hub_errors_are_translated(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)")

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("nope")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="could not reach the Hugging Face hub for "
                                              "dataset org/x; download it"):
        load_source("hf:org/x")
    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(ValueError, match="the Hugging Face hub has no dataset org/x"):
        load_source("hf:org/x")


# ---- record forms ----

def test_alpaca_input_defaults_to_empty_and_numbers_become_text(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum", "output": 3, "id": 7},
                                              {"instruction": "S", "input": None, "output": "x"}])
    assert load_source(str(path)) == [
        {"instruction": "Sum", "input": "", "output": "3", "id": 7},
        {"instruction": "S", "input": "", "output": "x"}]


def test_prompt_completion_text_and_conversational(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 2 3", "completion": " 4"}, conv])
    text, chat = load_source(str(path))
    assert text == {"prompt": "1 2 3", "completion": " 4"}
    assert chat == {"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}


def test_sharegpt_roles_become_chat_roles(tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "2+2?"},
                             {"from": "gpt", "value": "4"}], "source": "web"}
    [record] = load_source(str(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert record == {"source": "web", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}


def test_sharegpt_unknown_role_and_chat_without_answer_are_refused(tmp_path):
    bad_role = {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(ValueError, match=r"s.jsonl:1: ShareGPT turn from 'robot'; expected "
                                         r"one of \['assistant', 'gpt', 'human'"):
        load_source(str(write_jsonl(tmp_path / "s.jsonl", [bad_role])))
    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(ValueError, match=r"m.jsonl:1: 'messages' must end with the assistant's "
                                         r"answer, but the last turn is from 'user'"):
        load_source(str(write_jsonl(tmp_path / "m.jsonl", [no_answer])))
    with pytest.raises(ValueError, match=r"n.jsonl:1: 'messages' must be a non-empty list of "
                                         r"\{role, content\} objects"):
        load_source(str(write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"text": "q"}]}])))


def test_wrong_field_names_name_expected_and_found_fields_and_the_file(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"qa.csv:2: expected fields instruction/output \(input "
                                         r"optional\), prompt/completion, messages.*"
                                         r"found \['answer', 'question'\].*field-map"):
        load_source(str(path))
    with pytest.raises(ValueError, match=r"found \['answer', 'output', 'question'\] after "
                                         r"field-map \{'output': 'answer'\}"):
        load_source(str(path), {"output": "answer"})


def test_field_map_renames_columns_and_keeps_the_others(tmp_path):
    rows = [{"question": f"q{i}", "context": "c", "answer": f"a{i}", "site": "x"}
            for i in range(3)]
    path = write_parquet(tmp_path / "qa.parquet", rows)
    records = load_source(str(path), {"instruction": "question", "input": "context",
                                      "output": "answer"})
    assert [(r["instruction"], r["input"], r["output"], r["site"]) for r in records] == [
        (f"q{i}", "c", f"a{i}", "x") for i in range(3)]


def test_field_map_setting_is_parsed_and_validated():
    s = DataSettings(field_map=" instruction = question , output=answer ")
    assert s.field_mapping() == {"instruction": "question", "output": "answer"}
    assert DataSettings().field_mapping() == {}
    for bad in ("question=instruction", "instruction", "output=a,output=b", "output="):
        with pytest.raises(SettingsError, match="setting 'field-map': expected comma-separated "
                                                "<field>=<your column> pairs"):
            DataSettings(field_map=bad)
    with pytest.raises(SettingsError, match="setting 'data-split'"):
        DataSettings(data_split=" ")


def test_client_records_use_the_loader_field_map_and_a_seeded_split(tmp_path):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)]
    path = write_csv(tmp_path / "mine.csv", rows)
    s = DataSettings(data_path=str(path), field_map="prompt=q,completion=a", eval_fraction=0.25)
    train, held = client_records(s, 0, 1, seed=3)
    assert len(train) == 15 and len(held) == 5
    assert (train, held) == client_records(s, 0, 1, seed=3)
    assert sorted(r["prompt"] for r in train + held) == sorted(f"q{i}" for i in range(20))
    shared = DataSettings(dataset=str(write_saved(tmp_path / "saved", ALPACA * 4,
                                                  split="train")), eval_fraction=0.25)
    train0, held0 = client_records(shared, 0, 2, seed=0)
    train1, held1 = client_records(shared, 1, 2, seed=0)
    assert len(train0 + held0 + train1 + held1) == 20
    assert len(held0) == len(held1) == 2  # round(0.25 * 10)


# ---- formatting and response-only labels ----

def split_by_label(ex):
    """(prompt ids, answer ids) and a check that every label is its own input id or -100."""
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert all(lab in (IGNORE, i) for i, lab in zip(ex["input_ids"], ex["labels"]))
    prompt = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]
    return prompt, [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]


def test_chat_template_masks_the_prompt_token_by_token(tok):
    ex = tokenize({"messages": [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4"}]}, tok, 256)
    prompt_text = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tok("4<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + answer_ids
    assert ex["labels"] == [IGNORE] * len(prompt_ids) + answer_ids


def test_a_custom_chat_template_is_used_and_last_assistant_trains_the_last_answer_only():
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                       "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                  {"from": "human", "value": "1+1?"},
                                  {"from": "gpt", "value": "2"}]}
    [record] = load_source_rows([sharegpt])
    prompt, answer = split_by_label(tokenize(record, t, 256, train_on="last-assistant"))
    assert t.decode(prompt) == "[user] hi\n[assistant] yo\n[user] 1+1?\n[assistant] "
    assert t.decode(answer) == "2\n"
    prompt, answer = split_by_label(tokenize(record, t, 256))  # all-assistant, the default
    assert t.decode(prompt) == "[user] hi\n[assistant] [user] 1+1?\n[assistant] "
    assert t.decode(answer) == "yo\n2\n"


def load_source_rows(rows):
    """Records of in-memory rows through the same checks as a file's."""
    from fedlora.data.loaders import to_records

    return to_records([(f"row {i}", r) for i, r in enumerate(rows)], None, "rows")


def test_plain_template_without_a_chat_template(plain):
    prompt, answer = split_by_label(tokenize(ALPACA[0], plain, 256))
    assert plain.decode(prompt) == "### Instruction:\nAdd 0 and 1.\n\n### Response:\n"
    assert plain.decode(answer) == "1<|im_end|>"
    assert answer[-1] == plain.eos_token_id


def test_prompt_completion_is_raw_text_with_eos_and_loss_on_the_completion(tok):
    prompt, answer = split_by_label(tokenize({"prompt": "1 2 3", "completion": " 4"}, tok, 256))
    assert tok.decode(prompt) == "1 2 3"  # no chat template around a raw pair
    assert tok.decode(answer) == " 4<|im_end|>"


# ---- packing ----

def test_packing_fills_max_length_and_keeps_labels_aligned(tok):
    records = [{"instruction": "x" * (3 + i % 5), "output": "y" * (1 + i % 3)} for i in range(40)]
    examples = tokenize_records(records, tok, 64)
    packed = tokenize_records(records, tok, 64, packing=True)
    assert [len(p["input_ids"]) for p in packed[:-1]] == [64] * (len(packed) - 1)
    assert 0 < len(packed[-1]["input_ids"]) <= 64
    # the packed stream is the examples in order, each followed by an unlabelled EOS
    eos = tok.eos_token_id
    stream = [t for e in examples for t in e["input_ids"] + [eos]]
    labels = [t for e in examples for t in e["labels"] + [IGNORE]]
    assert [t for p in packed for t in p["input_ids"]] == stream
    assert [t for p in packed for t in p["labels"]] == labels
    # no prompt token is a target: the answers are exactly the unpacked examples' answers
    packed_answers = [split_by_label(p)[1] for p in packed]
    assert sum(packed_answers, []) == sum((split_by_label(e)[1] for e in examples), [])


def test_packing_separates_with_eos_only_when_an_example_does_not_end_with_it(plain):
    eos = plain.eos_token_id
    examples = [{"input_ids": [5, 6, eos], "labels": [IGNORE, 6, eos]},
                {"input_ids": [7, 8], "labels": [IGNORE, 8]}]
    assert pack(examples, 3, eos) == [{"input_ids": [5, 6, eos], "labels": [IGNORE, 6, eos],
                                       "position_ids": [0, 1, 2]},
                                      {"input_ids": [7, 8, eos], "labels": [IGNORE, 8, IGNORE],
                                       "position_ids": [0, 1, 2]}]


def test_packing_drops_sequences_with_nothing_to_predict():
    examples = [{"input_ids": [1] * 6, "labels": [IGNORE] * 6},
                {"input_ids": [2, 3], "labels": [IGNORE, 3]}]
    # sequences: [1,1,1,1] (no target), [1,1,9,2] (no target), [3,9] (label 3 at position 0:
    # never predicted after the shift) -> nothing left
    assert pack(examples, 4, 9) == []
    # with 5: [1,1,1,1,1] is dropped, [1,9,2,3,9] predicts 3 and stays
    # positions restart where the second example starts (and the first, cut, counts from 0)
    assert pack(examples, 5, 9) == [{"input_ids": [1, 9, 2, 3, 9],
                                     "labels": [IGNORE, IGNORE, IGNORE, 3, IGNORE],
                                     "position_ids": [0, 1, 0, 1, 2]}]


def test_packing_off_is_plain_tokenization_and_needs_an_eos_when_on(tok):
    assert tokenize_records(ALPACA, tok, 32) == [tokenize(r, tok, 32) for r in ALPACA]
    no_eos = byte_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="setting 'packing': .* the tokenizer has none"):
        tokenize_records(ALPACA, no_eos, 32, packing=True)


def test_client_data_packs_train_examples_but_not_eval(tmp_path):
    from types import SimpleNamespace

    from clients.client_app import DATA, client_data
    from fedlora.config import Settings

    path = write_jsonl(tmp_path / "d.jsonl", ALPACA * 8)
    slot = SimpleNamespace(source=SimpleNamespace(path="tiny"), tokenizer=byte_tokenizer())
    config = {"data-path": str(path), "max-length": 64, "eval-fraction": 0.25}
    unpacked = client_data(Settings.from_config({**config}), slot, 0, 1)
    packed = client_data(Settings.from_config({**config, "packing": True}), slot, 0, 1)
    DATA.clear()
    assert len(unpacked[0]) == 30 and len(packed[0]) < 30
    assert all(len(e["input_ids"]) == 64 for e in packed[0][:-1])
    assert packed[1] == unpacked[1]
