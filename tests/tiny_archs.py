"""Tiny random models of other architectures than Llama, built from transformers configs in
code and written as model folders (config.json + safetensors + the byte tokenizer), so that a
test can pass the folder as `model` like a user's own model. Two layers, hidden 32."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.models.builtin import byte_tokenizer

VOCAB = 320  # the byte tokenizer's 259 tokens, padded


def _configs(pad: int, eos: int) -> dict:
    from transformers import GPT2Config, OPTConfig, Phi3Config, Qwen2Config

    ids = {"vocab_size": VOCAB, "pad_token_id": pad, "eos_token_id": eos, "bos_token_id": eos,
           "tie_word_embeddings": False}
    return {
        # OPT: q/k/v/out_proj + fc1, fc2; word_embed_proj_dim = hidden (no project_in/out)
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512,
                         word_embed_proj_dim=32, **ids),
        # GPT-2: c_attn, c_proj, c_fc are transformers' Conv1D (weights stored (in, out))
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids),
        # Phi-3: fused qkv_proj and gate_up_proj, o_proj, down_proj
        "phi3": Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, **ids),
        # Qwen2: Llama's names, with biases on q, k, v
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, **ids),
    }


ARCHITECTURES = ("opt", "gpt2", "phi3", "qwen2")


def build_tiny(arch: str, folder: Path) -> Path:
    """Write a tiny random `arch` model (seeded) with the byte tokenizer to `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = _configs(tokenizer.pad_token_id, tokenizer.eos_token_id)[arch]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
