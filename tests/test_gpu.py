"""The CUDA path: QLoRA training steps, bf16 autocast, paged 8-bit AdamW, the pre-quantized
cache and a base model that stays on the GPU across rounds.

Every test here is marked `gpu` and skipped without CUDA; `scripts/gpu-check.sh` runs them on a
GPU machine (with a throughput benchmark). They use the tiny built-in model, so they take
seconds there.
"""

import pytest
import torch

from fedlora.adapters import Workspace
from fedlora.config import Settings
from fedlora.data import client_records, tokenize
from fedlora.train import RoundPlan, evaluate, train_local

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_settings(**extra) -> Settings:
    return Settings.from_config({"model": "tiny-llama", "lora-rank": 4, "local-steps": 20,
                                 "lr": 1e-2, "dataset-size": 200, "device": "cuda", **extra})


def setup(settings: Settings, workspace: Workspace | None = None):
    slot = (workspace or Workspace()).get(settings.model, settings.lora, settings.train)
    train, held = client_records(settings.data, 0, 1, seed=0)
    tok = lambda rs: [tokenize(r, slot.tokenizer, settings.train.max_length) for r in rs]
    return slot, tok(train), tok(held)


def trains(settings: Settings, workspace: Workspace | None = None):
    """Train once; return (slot, held-out loss before, after)."""
    slot, train, held = setup(settings, workspace)
    pad = slot.tokenizer.pad_token_id
    before = evaluate(slot.model, held, pad).loss
    train_local(slot.model, slot.adapter, train, pad, settings.train, RoundPlan())
    return slot, before, evaluate(slot.model, held, pad).loss


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def test_a_qlora_step_on_an_nf4_double_quantised_base():
    import bitsandbytes as bnb

    slot, before, after = trains(cuda_settings(quantization="4bit"))
    layers = [m for m in slot.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the base has no 4-bit linear layers"
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert all(p.device.type == "cuda" for p in lora_parameters(slot.model))
    assert after < before


def test_a_4bit_base_in_bf16_keeps_its_norms_bf16_and_trains():
    """No fp32 upcast of a quantized base's other weights in bf16 on CUDA (Workspace's
    upcasts_norms): the activations stay bf16, the adapter float32."""
    slot, before, after = trains(cuda_settings(quantization="4bit"))
    norms = [p for n, p in slot.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    assert all(p.dtype == torch.float32 for p in lora_parameters(slot.model))
    assert after < before


def test_bf16_autocast_trains_with_float32_adapter_weights():
    slot, before, after = trains(cuda_settings(bf16=True))
    assert all(p.dtype == torch.float32 for p in lora_parameters(slot.model))
    assert after < before


def test_paged_adamw_8bit_trains_on_cuda():
    from fedlora.train.loop import make_optimizer

    settings = cuda_settings(quantization="4bit", optimizer="paged-adamw-8bit")
    slot, before, after = trains(settings)
    optimizer = make_optimizer(lora_parameters(slot.model), settings.train, "cuda")
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    assert after < before


def test_the_prequantized_cache_loads_onto_cuda(tmp_path, monkeypatch):
    from fedlora.models import load_model

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    settings = cuda_settings(quantization="4bit").model
    first, tokenizer, _ = load_model(settings)  # quantizes on the GPU, writes the copy
    second, _, _ = load_model(settings)  # reads the copy
    assert second.name_or_path.startswith(str(tmp_path / "models" / "4bit-"))
    assert type(second.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert all(p.device.type == "cuda" for p in second.parameters())
    ids = torch.tensor([tokenizer.encode("12+7=")], device="cuda")
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_the_base_model_stays_on_the_gpu_across_rounds():
    """What the resident worker relies on: one process-wide Workspace, one load, one
    allocation of the base; a second round reuses both."""
    workspace = Workspace()
    settings = cuda_settings(quantization="4bit", **{"local-steps": 3})
    slot, _, _ = trains(settings, workspace)
    torch.cuda.synchronize()
    after_round_one = torch.cuda.memory_allocated()
    base_bytes = sum(p.numel() * p.element_size() for p in slot.model.parameters())
    slot2, _, _ = trains(settings, workspace)
    torch.cuda.synchronize()
    assert workspace.loads == 1 and slot2.model is slot.model
    assert torch.cuda.memory_allocated() - after_round_one < base_bytes / 2
