"""Adapters: only low-rank factors leave, state round-trips, exports load with PEFT."""

import json

import pytest
import torch
from peft import PeftModel

from fedlora.adapters import (
    Workspace,
    add_lora,
    flatten,
    get_lora_state,
    lora_config,
    save_adapter,
    set_lora_state,
    unflatten,
)
from fedlora.config import LoraSettings, ModelSettings, TrainSettings
from fedlora.models import load_model


def test_state_holds_only_lora_factors_and_no_base_weight(tiny_slot):
    state = get_lora_state(tiny_slot.model, tiny_slot.adapter)
    assert state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    # 2 layers x 7 modules x (A, B); rank 4; hidden 64, intermediate 128
    assert len(state) == 28
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert sum(v.numel() for v in state.values()) == 2 * per_layer
    base_keys = set(load_model(ModelSettings(name="tiny-llama", device="cpu"))[0].state_dict())
    assert not any(k.replace("base_model.model.", "") in base_keys for k in state)


def test_get_set_round_trips_exactly(tiny_slot):
    model, name = tiny_slot.model, tiny_slot.adapter
    new = {k: torch.randn_like(v) for k, v in get_lora_state(model, name).items()}
    set_lora_state(model, new, name)
    back = get_lora_state(model, name)
    assert all(torch.equal(back[k], new[k]) for k in new)


def test_set_refuses_wrong_keys_and_shapes(tiny_slot):
    model, name = tiny_slot.model, tiny_slot.adapter
    state = get_lora_state(model, name)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_lora_state(model, {k: v for k, v in state.items() if k != key}, name)
    with pytest.raises(ValueError, match="expected shape"):
        set_lora_state(model, {**state, key: torch.zeros(1, 1)}, name)


def test_split_and_join_are_inverse(tiny_slot):
    state = get_lora_state(tiny_slot.model, tiny_slot.adapter)
    factors = unflatten(state)
    b, a = factors["base_model.model.model.layers.0.self_attn.q_proj"]
    assert b.shape == (64, 4) and a.shape == (4, 64)
    assert flatten(factors).keys() == state.keys()


def test_unknown_target_module_is_refused_with_the_available_names():
    model, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    with pytest.raises(ValueError, match="'foo_proj'\\] not found.*'q_proj'"):
        add_lora(model, LoraSettings(target_modules="q_proj,foo_proj"))


def test_exported_adapter_loads_with_peft_and_reproduces_logits(tmp_path, tiny_slot):
    model, name = tiny_slot.model, tiny_slot.adapter
    state = {k: torch.randn_like(v) * 0.1 for k, v in get_lora_state(model, name).items()}
    set_lora_state(model, state, name)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model.eval()(input_ids=ids).logits
    save_adapter(state, lora_config(LoraSettings(rank=4), "tiny-llama"), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    plain = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_workspace_loads_the_base_once_and_swaps_adapters():
    ws = Workspace()
    m = ModelSettings(name="tiny-llama", device="cpu")
    s4 = ws.get(m, LoraSettings(rank=4), TrainSettings())
    s8 = ws.get(m, LoraSettings(rank=8), TrainSettings())
    again = ws.get(m, LoraSettings(rank=4), TrainSettings())
    assert ws.loads == 1 and s4.model is s8.model and again.adapter == s4.adapter != s8.adapter
    shapes = {v.shape[0] for k, v in get_lora_state(s8.model, s8.adapter).items() if "lora_A" in k}
    assert shapes == {8}
