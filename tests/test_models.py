"""Model loading: built-ins, quantization on the CPU, and clear errors for bad names."""


import pytest
import torch

from fedlora.config import ModelSettings
from fedlora.models import ModelLoadError, load_model, resolve_source
from fedlora.models.builtin import BUILTINS, byte_tokenizer


def test_tiny_llama_is_deterministic_and_frozen():
    m1, tok, src = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    m2, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m1.state_dict()[w], m2.state_dict()[w])
    assert not any(p.requires_grad for p in m1.parameters())
    assert src.base_id == "tiny-llama" and tok.pad_token_id is not None


def test_byte_tokenizer_round_trips_any_text_and_has_a_chat_template():
    tok = byte_tokenizer()
    text = "héllo, 12 + 30 = 42 ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_base_loads_and_runs_on_cpu(quantization, layer):
    model, _, _ = load_model(ModelSettings(name="tiny-llama", quantization=quantization,
                                           device="cpu"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 320) and torch.isfinite(logits).all()


def test_4bit_uses_nf4_with_double_quantization_and_the_compute_dtype():
    model, _, _ = load_model(ModelSettings(name="tiny-llama", quantization="4bit", device="cpu",
                                           compute_dtype="bfloat16"))
    q = model.config.quantization_config
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


def test_unknown_name_says_what_to_pass():
    with pytest.raises(ModelLoadError, match="unknown model 'nosuch'.*built-in name \\(tiny-llama"):
        resolve_source("nosuch")


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    """Offline, an uncached hub id fails with advice and without opening a connection."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection while offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelLoadError, match="cannot be reached.*huggingface-cli download "
                                             "someone/not-cached-model"):
        resolve_source("someone/not-cached-model")


def test_missing_gguf_and_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_source(str(tmp_path))


def test_local_folder_loads(tmp_path):
    model, tok, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _, src = load_model(ModelSettings(name=str(tmp_path), device="cpu"))
    assert src.path == str(tmp_path.resolve())
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_cuda_request_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(ModelSettings(name="tiny-llama", device="cuda"))


def test_an_unknown_model_name_is_refused_with_what_to_pass():
    with pytest.raises(ModelLoadError) as err:
        resolve_source("tiny-lama")
    message = str(err.value)
    assert "unknown model 'tiny-lama'" in message
    assert all(name in message for name in BUILTINS), message


def test_a_quantized_base_keeps_bf16_norms_in_bf16(monkeypatch):
    from fedlora.adapters.workspace import upcasts_norms

    assert upcasts_norms(ModelSettings(quantization="4bit", device="cpu"))  # auto: float32
    assert not upcasts_norms(ModelSettings(quantization="4bit", device="cpu",
                                           compute_dtype="bfloat16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not upcasts_norms(ModelSettings(quantization="4bit", device="cuda"))  # auto: bf16
    assert upcasts_norms(ModelSettings(quantization="4bit", device="cuda",
                                       compute_dtype="float16"))


@pytest.mark.parametrize("setting,enabled", [(None, "False"), ("1", "True")])
def test_hub_kernels_are_off_unless_the_user_turns_them_on(setting, enabled):
    """transformers would fetch and run kernels from the hub at load on CUDA; a fedlora
    process does not, unless USE_HUB_KERNELS is set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    if setting is not None:
        env["USE_HUB_KERNELS"] = setting
    code = ("import fedlora; from transformers.integrations.hub_kernels import "
            "_kernels_enabled; print(_kernels_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    assert out.strip() == enabled
