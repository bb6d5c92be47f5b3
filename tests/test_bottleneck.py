"""Bottleneck adapters (`peft = "adapter"`, fedlora.adapters.bottleneck): PEFT's half (its
enum member, config, layer, state dicts, save and load, 4-bit base, gradient checkpointing)
and fedlora's (settings refused, the seeded start). The federated runs are in
test_peft_methods.py with the other plain-tensor methods."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from peft.utils.peft_types import PeftType

from fedlora.adapters import Workspace, peft_method
from fedlora.adapters.bottleneck import (
    BOTTLENECK,
    BottleneckConfig,
    BottleneckLayer,
    add_peft_type,
)
from fedlora.config import ModelSettings, Settings, SettingsError
from fedlora.data import client_records, collate, tokenize
from fedlora.methods import load
from fedlora.models import load_model, model_skeleton, resolve_source
from fedlora.train import RoundPlan, train_local
from fedlora.train.loss import response_loss

RUN = {"model": "tiny-llama", "device": "cpu", "peft": "adapter", "adapter-size": 8,
       "local-steps": 6, "lr": 1e-2, "dataset-size": 64, "batch-size": 4}
IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
ADAPTER = peft_method("adapter")


def settings(**extra) -> Settings:
    return load({**RUN, **extra})[0]


def slot_of(s: Settings):
    torch.manual_seed(0)
    return Workspace().get(s.model, s.lora, s.train)


def examples(slot, s: Settings, n: int = 16) -> list[dict]:
    train, _ = client_records(s.data, 0, 1, seed=0)
    return [tokenize(r, slot.tokenizer, s.train.max_length) for r in train[:n]]


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".bottleneck_" in n}


def base_logits(**model) -> torch.Tensor:
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu", **model))
    with torch.no_grad():
        return base(input_ids=IDS).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---- PEFT's side -----------------------------------------------------------------------------

def test_bottleneck_is_a_peft_type_by_value_name_and_attribute():
    assert PeftType("BOTTLENECK") is PeftType["BOTTLENECK"] is BOTTLENECK
    assert PeftType.BOTTLENECK is BOTTLENECK and BOTTLENECK in list(PeftType)
    assert add_peft_type("BOTTLENECK") is BOTTLENECK  # a second import adds nothing
    assert {BOTTLENECK: 1}["BOTTLENECK"] == 1  # PEFT's registries are looked up by the string


def test_the_config_validates_its_fields_and_round_trips_through_json(tmp_path):
    with pytest.raises(ValueError, match="bottleneck_size: expected an integer >= 1.*got 0"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="target_modules: .*got an empty one"):
        BottleneckConfig(target_modules=[])
    BottleneckConfig(bottleneck_size=12, target_modules=["o_proj"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["bottleneck_size"] == 12
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, BottleneckConfig) and loaded.peft_type is BOTTLENECK
    assert loaded.bottleneck_size == 12 and loaded.target_modules == {"o_proj"}


def test_the_adapted_model_equals_the_base_model_at_the_start():
    expected = base_logits()
    s = settings()
    slot = slot_of(s)
    assert torch.equal(logits(slot.model), expected)  # up = 0: h + 0 is h, bit for bit
    shapes = ADAPTER.dense_shapes(model_skeleton(resolve_source("tiny-llama")), s.lora)
    ADAPTER.set_state(slot.model, slot.adapter, ADAPTER.initial_dense(shapes, seed=3))
    assert torch.equal(logits(slot.model), expected)  # the server's start too
    with torch.no_grad():  # a nonzero up-projection changes the output: the check can fail
        next(p for n, p in adapter_params(slot.model).items() if "bottleneck_up" in n).add_(0.1)
    assert not torch.allclose(logits(slot.model), expected, atol=1e-4)


@pytest.mark.parametrize("targets,places", [("all-linear", {"o_proj": 64, "down_proj": 64}),
                                            ("q_proj,gate_proj", {"q_proj": 64, "gate_proj": 128})])
def test_only_the_adapters_train_and_they_are_what_a_client_sends(targets, places):
    s = settings(**{"target-modules": targets})
    slot = slot_of(s)
    config = slot.model.get_base_model().config
    # tiny-llama: 2 layers, s = 8
    layers, size = config.num_hidden_layers, s.lora.options["adapter-size"]
    trainable = {n: p for n, p in slot.model.named_parameters() if p.requires_grad}
    assert trainable.keys() == adapter_params(slot.model).keys()
    assert all(p.dtype == torch.float32 for p in trainable.values())
    state = ADAPTER.get_state(slot.model, slot.adapter)
    # per adapted projection of width d: down (s, d) + (s,), up (d, s) + (d,) = 2 d s + d + s
    expected = {}
    for i in range(layers):
        for name, d in places.items():
            block = "self_attn" if name.endswith(("q_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{name}.bottleneck_"
            expected.update({key + "down.weight": (size, d), key + "down.bias": (size,),
                             key + "up.weight": (d, size), key + "up.bias": (d,)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    count = layers * sum(2 * d * size + d + size for d in places.values())
    assert sum(p.numel() for p in trainable.values()) == count == sum(
        v.numel() for v in state.values())
    if targets == "all-linear":  # hidden 64, 2 layers, s = 8: 2 x 2 x (2*64*8 + 64 + 8)
        assert count == 4384
    shapes = ADAPTER.dense_shapes(model_skeleton(resolve_source("tiny-llama")), s.lora)
    assert shapes == expected  # what the server reads off the meta-device skeleton


def test_the_seeded_start_is_shared_per_seed_with_up_and_biases_zero():
    shapes = ADAPTER.dense_shapes(model_skeleton(resolve_source("tiny-llama")), settings().lora)
    a, b = ADAPTER.initial_dense(shapes, seed=1), ADAPTER.initial_dense(shapes, seed=1)
    c = ADAPTER.initial_dense(shapes, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    downs = [k for k in a if k.endswith("bottleneck_down.weight")]
    assert len(downs) == 4 and all(not torch.equal(a[k], c[k]) for k in downs)
    assert not torch.equal(a[downs[0]], a[downs[1]])  # each layer its own draw
    for k in downs:  # as a Linear(64 -> 8) draws: U(-1/8, 1/8)
        assert 0.1 < float(a[k].abs().max()) <= 1 / 8
    assert all(not a[k].any() for k in a if k not in downs)
    with pytest.raises(ValueError, match="expected a bottleneck adapter's tensor"):
        ADAPTER.initial_dense({"x.lora_A.weight": (2, 2)}, seed=0)


def test_save_pretrained_and_from_pretrained_reproduce_a_trained_adapter(tmp_path, capsys):
    from fedlora.cli.main import main

    s = settings()
    slot = slot_of(s)
    result = train_local(slot.model, slot.adapter, examples(slot, s), slot.tokenizer.pad_token_id,
                         s.train, RoundPlan())
    assert result.last_loss < result.first_loss
    trained = logits(slot.model)
    assert not torch.allclose(trained, base_logits(), atol=1e-4)
    slot.model.save_pretrained(str(tmp_path), selected_adapters=[slot.adapter],
                               save_embedding_layers=False)
    folder = tmp_path / slot.adapter  # PEFT saves a non-default adapter in its own folder
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    fresh, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    loaded = PeftModel.from_pretrained(fresh, str(folder))
    assert torch.allclose(logits(loaded), trained, atol=1e-6)
    saved = get_peft_model_state_dict(loaded, save_embedding_layers=False)
    assert saved.keys() == ADAPTER.get_state(slot.model, slot.adapter).keys()
    # it cannot be merged into the base weights: export says why and writes nothing
    code = main(["export", "--adapter", str(folder), "--model", "tiny-llama", "--output-dir",
                 str(tmp_path / "merged")])
    assert code == 2 and not (tmp_path / "merged").exists()
    assert "cannot be merged" in capsys.readouterr().err


def test_training_on_a_4bit_base_keeps_float32_adapters_and_lowers_the_loss():
    import bitsandbytes as bnb

    s = settings(quantization="4bit")
    slot = slot_of(s)
    layer = slot.model.get_base_model().model.layers[0].self_attn.o_proj
    assert isinstance(layer, BottleneckLayer)
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert all(p.dtype == torch.float32 for p in adapter_params(slot.model).values())
    assert torch.equal(logits(slot.model), base_logits(quantization="4bit"))
    data = examples(slot, s)
    batch = collate(data[:8], slot.tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(response_loss(slot.model, batch)[0])
    train_local(slot.model, slot.adapter, data, slot.tokenizer.pad_token_id, s.train,
                RoundPlan())
    slot.model.eval()
    with torch.no_grad():
        after = float(response_loss(slot.model, batch)[0])
    assert after < before - 0.05


def gradients(s: Settings, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    slot = slot_of(s)
    assert slot.model.get_base_model().is_gradient_checkpointing == s.train.gradient_checkpointing
    ADAPTER.set_state(slot.model, slot.adapter, state)
    slot.model.train()
    batch = collate(examples(slot, s, 4), slot.tokenizer.pad_token_id)
    loss, _ = response_loss(slot.model, batch)
    loss.backward()
    return {n.replace(f".{slot.adapter}.", "."): p.grad.clone()
            for n, p in adapter_params(slot.model).items()}


def test_gradient_checkpointing_gives_the_same_gradients():
    shapes = ADAPTER.dense_shapes(model_skeleton(resolve_source("tiny-llama")), settings().lora)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=gen) * 0.1 for k, v in shapes.items()}  # up != 0
    plain = gradients(settings(), state)
    checkpointed = gradients(settings(**{"gradient-checkpointing": True}), state)
    assert plain.keys() == checkpointed.keys() and len(plain) == 16
    assert all(float(g.abs().sum()) > 0 for g in plain.values())
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_two_adapter_sizes_share_one_base_and_switch():
    ws = Workspace()
    small, large = settings(), settings(**{"adapter-size": 4})
    a = ws.get(small.model, small.lora, small.train)
    b = ws.get(large.model, large.lora, large.train)
    assert ws.loads == 1 and a.model is b.model and a.adapter != b.adapter
    width = {k: v.shape[0] for k, v in ADAPTER.get_state(b.model, b.adapter).items()
             if k.endswith("down.weight")}
    assert set(width.values()) == {4}
    assert {n for n, p in b.model.named_parameters() if p.requires_grad} == {
        n for n in adapter_params(b.model) if f".{b.adapter}." in n}


# ---- fedlora's settings ----------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("lora-rank", 4), ("lora-alpha", 8.0),
                                       ("num-virtual-tokens", 8), ("client-ranks", "4,8")])
def test_adapter_refuses_the_settings_of_other_methods(key, value):
    with pytest.raises(SettingsError, match=f"setting '{key}': peft=adapter does not use it"):
        load({"peft": "adapter", key: value})


@pytest.mark.parametrize("peft", ["lora", "ia3", "prompt-tuning"])
def test_other_methods_refuse_adapter_size(peft):
    with pytest.raises(SettingsError, match=rf"setting 'adapter-size': peft={peft} does not use "
                                            rf"it \(an option of peft=adapter\)"):
        load({"peft": peft, "adapter-size": 16})
    load({"peft": peft, "adapter-size": 64})  # the default is no change


def test_adapter_size_and_target_modules_are_checked_by_name():
    with pytest.raises(SettingsError, match="'adapter-size': expected an integer >= 1, got 0"):
        load({"peft": "adapter", "adapter-size": 0})
    s = settings(**{"target-modules": "o_proj,nope"})
    base, _, _ = load_model(s.model)
    with pytest.raises(ValueError, match=r"'target-modules': \['nope'\] not found"):
        ADAPTER.add(base, s.lora, "x")
