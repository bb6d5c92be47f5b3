"""fedlora generate and fedlora.inference.generate on the tiny built-in model."""

import copy
import io

import pytest
import torch
from peft import PeftModel

from fedlora.adapters import Workspace, get_lora_state, lora_config, save_adapter
from fedlora.cli.main import main
from fedlora.config import LoraSettings, ModelSettings, TrainSettings
from fedlora.inference import chat_prompt, generate, user_prompt
from fedlora.models import load_model

PROMPTS = ["Compute 47 + 18.", "Hi", "Reverse the letters of the word kelmo, please."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A saved rank-4 adapter with random nonzero A and B, recording tiny-llama as its base."""
    slot = Workspace().get(ModelSettings(name="tiny-llama", device="cpu"), LoraSettings(rank=4),
                           TrainSettings())
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3
             for k, v in get_lora_state(slot.model, slot.adapter).items()}
    folder = tmp_path_factory.mktemp("gen") / "adapter"
    save_adapter(state, lora_config(LoraSettings(rank=4), "tiny-llama"), folder,
                 extra={"model": "tiny-llama"})
    return folder


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    return model, tokenizer


def cli_reply(capsys, *args):
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "12", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_adapter_changes_the_reply_and_greedy_is_deterministic(adapter_dir, capsys):
    tuned = cli_reply(capsys, "--adapter", str(adapter_dir), "--prompt", "Compute 2 + 3.")
    again = cli_reply(capsys, "--adapter", str(adapter_dir), "--prompt", "Compute 2 + 3.")
    base = cli_reply(capsys, "--adapter", str(adapter_dir), "--no-adapter",
                     "--prompt", "Compute 2 + 3.")
    assert tuned.strip() and tuned == again and tuned != base
    assert base == cli_reply(capsys, "--model", "tiny-llama", "--no-adapter",
                             "--prompt", "Compute 2 + 3.")


def test_only_the_new_text_is_returned(tiny):
    model, tokenizer = tiny
    prompt = user_prompt(PROMPTS[0], tokenizer)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate(model, tokenizer, [prompt], max_new_tokens=10) == [expected]
    assert PROMPTS[0] not in expected


def test_batched_left_padded_generation_equals_one_by_one(tiny, adapter_dir):
    base, tokenizer = tiny
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    prompts = [user_prompt(p, tokenizer) for p in PROMPTS]
    single = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=8) == single
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2) == single
    assert tokenizer.padding_side == "right"  # restored for training


def test_prompts_use_the_training_templates(tiny):
    _, tokenizer = tiny
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "2+2?"}]
    assert chat_prompt(history, tokenizer) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert user_prompt("2+2?", plain) == "### Instruction:\n2+2?\n\n### Response:\n"


def test_chat_reads_stdin_until_an_empty_line(adapter_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand again\n\nnot read\n"))
    calls = []
    import fedlora.inference

    real = fedlora.inference.generate
    monkeypatch.setattr(fedlora.inference, "generate",
                        lambda m, t, prompts, *a: calls.append(prompts[0])
                        or real(m, t, prompts, *a))
    cli_reply(capsys, "--adapter", str(adapter_dir), "--chat")
    assert len(calls) == 2 and "hi" in calls[1] and "and again" in calls[1]
    assert "not read" not in "".join(calls)


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-llama", "--no-adapter"], "pass either --prompt TEXT or --chat"),
    (["--prompt", "x"], "pass --adapter DIR"),
    (["--model", "tiny-llama", "--prompt", "x"], "--no-adapter to use the base model"),
    (["--adapter", "/nonexistent", "--prompt", "x"], "is not a PEFT adapter folder"),
])
def test_bad_flags_exit_2(args, message, capsys):
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err
