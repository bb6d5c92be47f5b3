"""Preference records (objective=dpo): every form TRL's preference datasets use, in the file
formats fedlora reads, refused with file:line when malformed; pairs tokenized with a shared
prompt and labels on the responses only."""

from __future__ import annotations

import json

import pytest

from fedlora.config import ModelSettings
from fedlora.data import load_source
from fedlora.data.preference import as_pairs, bigbench_pairs, refuse_pairs, tokenize_pair
from fedlora.models import load_model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_text_chat_and_implicit_prompt_forms_load(tmp_path):
    text = load_source(write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "topic": "math"}]))
    assert text == [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "topic": "math",
                     "chat": False}]
    user = [{"role": "user", "content": "2+2?"}]
    chat = load_source(write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]}]))
    implicit = load_source(write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": user + [{"role": "assistant", "content": "4"}],
         "rejected": user + [{"role": "assistant", "content": "5"}]}]))
    assert chat == implicit
    assert chat[0]["prompt"] == user and chat[0]["chat"] is True
    assert chat[0]["rejected"] == [{"role": "assistant", "content": "5"}]


def test_hh_rlhf_text_pairs_take_the_text_they_share_as_the_prompt(tmp_path):
    """Anthropic's HH-RLHF form: chosen and rejected are whole dialogues as text, no prompt;
    the prompt is what they share, cut to a word boundary (the shared word 'I' stays in it)."""
    dialogue = "\n\nHuman: Is 7 greater than 3?\n\nAssistant:"
    pairs = load_source(write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": dialogue + " I think yes.", "rejected": dialogue + " I doubt it."},
        {"chosen": "Q:2+2=4", "rejected": "Q:2+2=5"}]))
    assert pairs[0] == {"prompt": dialogue + " I", "chosen": " think yes.",
                        "rejected": " doubt it.", "chat": False}
    assert (pairs[1]["prompt"], pairs[1]["chosen"], pairs[1]["rejected"]) == ("Q:2+2=", "4", "5")


def test_ultrafeedback_form_a_text_prompt_with_whole_conversations(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a text prompt, and chosen / rejected as whole
    conversations whose first turn is that prompt: the shared turns are the prompt (not the
    prompt twice); with assistant messages only, the text prompt is the user's turn."""
    user = [{"role": "user", "content": "Is 7 greater than 3?"}]
    yes, no = ([{"role": "assistant", "content": a}] for a in ("Yes.", "No."))
    whole, responses = (load_source(write_jsonl(tmp_path / name, [row])) for name, row in (
        ("uf.jsonl", {"prompt": user[0]["content"], "chosen": user + yes, "rejected": user + no,
                      "score_chosen": 8.0, "score_rejected": 2.0}),
        ("r.jsonl", {"prompt": user[0]["content"], "chosen": yes, "rejected": no})))
    assert whole[0]["prompt"] == responses[0]["prompt"] == user
    assert whole[0]["chosen"] == responses[0]["chosen"] == yes
    assert whole[0]["score_chosen"] == 8.0 and whole[0]["chat"] is True


def test_csv_with_a_field_map(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,good,bad\nCapital of France?,Paris,Berlin\n", encoding="utf-8")
    from fedlora.config import parse_field_map

    mapping = parse_field_map("prompt=question,chosen=good,rejected=bad")  # as the setting
    pairs = load_source(str(path), mapping)
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == (
        "Capital of France?", "Paris", "Berlin")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, r"t\.jsonl:2: 'chosen' and 'rejected' "
                                                      r"are the same response"),
    ({"chosen": "a", "rejected": "b"}, r"t\.jsonl:2: text responses need a text 'prompt' "
                                       r"field, or chosen and rejected that begin with"),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     r"t\.jsonl:2: 'chosen' must end with an assistant message, got one from 'user'"),
    ({"prompt": "p", "chosen": 3.5, "rejected": [{"x": 1}]},
     r"t\.jsonl:2: 'chosen' must be text or a non-empty list of \{role, content\}"),
])
def test_malformed_pairs_are_refused_with_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"},
                                              row])
    with pytest.raises(ValueError, match=message):
        load_source(path)


def test_dpo_refuses_sft_records_and_sft_refuses_pairs(tmp_path):
    sft = [{"instruction": "q", "output": "a", "input": ""}]
    with pytest.raises(ValueError, match=r"data\.jsonl: objective=dpo trains on preference "
                                         r"records .* the fields \['input', 'instruction', "
                                         r"'output'\]; set objective=sft"):
        as_pairs(sft, 0, "data.jsonl")
    pairs = load_source(write_jsonl(tmp_path / "p.jsonl",
                                    [{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    assert as_pairs(pairs, 0, "p.jsonl") == pairs
    with pytest.raises(ValueError, match="p.jsonl holds preference records .* objective=dpo"):
        refuse_pairs(pairs, "p.jsonl")


def test_bigbench_multiple_choice_becomes_pairs_and_generative_is_refused():
    records = [{"instruction": "Q: 1+1?", "output": "2", "targets": ["2"], "task": "t",
                "choices": ["1", "2", "3"]},
               {"instruction": "Q: yes?", "output": "yes", "targets": ["yes", "no"],
                "task": "t", "choices": ["yes", "no"]}]  # every choice right: no pair
    pairs = bigbench_pairs(records, seed=0)
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "2"
    assert pairs[0]["rejected"][0]["content"] in ("1", "3")
    assert pairs == bigbench_pairs(records, seed=0)  # seeded
    with pytest.raises(ValueError, match="generative .* need multiple-choice tasks"):
        bigbench_pairs([{"instruction": "q", "output": "a", "targets": ["a"], "task": "g"}], 0)


@pytest.fixture(scope="module")
def tokenizer():
    """tiny-llama's tokenizer (it has no chat template: the plain template renders chat)."""
    return load_model(ModelSettings(name="tiny-llama", device="cpu"))[1]


@pytest.mark.parametrize("chat", [False, True])
def test_a_pair_shares_its_prompt_and_labels_only_the_responses(tokenizer, chat):
    if chat:
        pair = {"prompt": [{"role": "user", "content": "Capital of France?"}],
                "chosen": [{"role": "assistant", "content": "Paris"}],
                "rejected": [{"role": "assistant", "content": "Berlin, I think"}], "chat": True}
    else:
        pair = {"prompt": "Capital of France? ", "chosen": "Paris", "rejected": "Berlin, I think",
                "chat": False}
    out = tokenize_pair(pair, tokenizer, max_length=256)
    n = out["labels"].count(-100)
    assert n == out["rejected_labels"].count(-100) > 0
    assert out["input_ids"][:n] == out["rejected_input_ids"][:n]  # one prompt
    said = lambda ids, labels: tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "Paris" in said(out["input_ids"], out["labels"])
    assert "Berlin, I think" in said(out["rejected_input_ids"], out["rejected_labels"])
    assert "France" not in said(out["input_ids"], out["labels"])


def test_a_long_prompt_is_cut_so_that_the_longer_response_fits(tokenizer):
    pair = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no, and a long reason " * 3,
            "chat": False}
    out = tokenize_pair(pair, tokenizer, max_length=64)
    assert len(out["rejected_input_ids"]) <= 64 and len(out["input_ids"]) <= 64
    rejected = [t for t, lab in zip(out["rejected_input_ids"], out["rejected_labels"])
                if lab != -100]
    assert tokenizer.decode(rejected).startswith("no, and a long reason")
    assert out["labels"].count(-100) == out["rejected_labels"].count(-100)
