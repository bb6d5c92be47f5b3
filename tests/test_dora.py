"""DoRA (`peft = "dora"`, fedlora/adapters/dora.py): B and A federated as LoRA's factors, each
layer's magnitude as its offset from the base's own row norms; the export is PEFT's format."""

from __future__ import annotations

import pytest
import torch
from fake_grid import run_inprocess
from peft import PeftModel
from safetensors.torch import load_file
from test_peft_methods import IDS, RUN, recording_hook

from fedlora.adapters import peft_method
from fedlora.adapters.dora import PEFT_SUFFIX, WIRE_SUFFIX, base_norms, file_norms, row_norms
from fedlora.checkpoint import read_latest
from fedlora.config import ModelSettings, SettingsError, lora_scale
from fedlora.factors import A_SUFFIX, B_SUFFIX, to_peft, unflatten
from fedlora.methods import load
from fedlora.models import load_model, resolve_source
from fedlora.outputs import read_metrics, training_rounds

DORA = {**RUN, "peft": "dora", "lora-rank": 4, "target-modules": "q_proj,v_proj"}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def dora_model(quantization: str = "none"):
    settings, _ = load(DORA)
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu",
                                          quantization=quantization))
    return peft_method("dora").add(base, settings.lora, "d"), settings


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_a_fresh_dora_adapter_sends_zero_offsets_and_both_factors(quantization):
    model, _ = dora_model(quantization)
    state = peft_method("dora").get_state(model, "d")
    offsets = {k: v for k, v in state.items() if k.endswith(WIRE_SUFFIX)}
    # tiny-llama: 2 layers x (q_proj: 64 rows, v_proj: 32 rows)
    assert {k: tuple(v.shape) for k, v in offsets.items() if "layers.0" in k} == {
        f"{Q}{WIRE_SUFFIX}": (64,),
        f"base_model.model.model.layers.0.self_attn.v_proj{WIRE_SUFFIX}": (32,)}
    assert len(offsets) == 4 and all(torch.equal(v, torch.zeros_like(v))
                                     for v in offsets.values())
    assert state[Q + A_SUFFIX].shape == (4, 64) and state[Q + B_SUFFIX].shape == (64, 4)
    assert not any(k.endswith(PEFT_SUFFIX) for k in state)  # never the absolute magnitude


def test_set_state_puts_the_offset_on_this_model_s_own_row_norms():
    model, _ = dora_model()
    method = peft_method("dora")
    state = method.get_state(model, "d")
    state[Q + WIRE_SUFFIX] = torch.full((64,), 0.25)
    method.set_state(model, "d", state)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["d"].weight.detach()
    assert torch.allclose(magnitude, row_norms(layer.base_layer.weight) + 0.25)
    assert torch.allclose(method.get_state(model, "d")[Q + WIRE_SUFFIX], torch.full((64,), 0.25))
    assert torch.allclose(base_norms(model)[Q], row_norms(layer.base_layer.weight))
    with pytest.raises(ValueError, match="expected shape"):
        method.set_state(model, "d", {**state, Q + WIRE_SUFFIX: torch.zeros(3)})


def test_the_server_starts_from_zero_offsets_read_off_the_skeleton():
    from server.server_app import adapted_shapes

    settings, _ = load(DORA)
    shapes = adapted_shapes(settings)
    assert len(shapes.factors) == 4 and shapes.factors[Q] == (64, 64)
    assert shapes.dense == {f"{m}{WIRE_SUFFIX}": (d,) for m, (d, _) in shapes.factors.items()}
    assert all(float(v.abs().sum()) == 0 for v in
               peft_method("dora").initial_dense(shapes.dense, seed=0).values())


def test_the_saved_magnitude_is_the_base_row_norm_plus_the_global_offset():
    source = resolve_source("tiny-llama")
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    weight = base.model.layers[0].self_attn.q_proj.weight
    state = {Q + A_SUFFIX: torch.ones(4, 64), Q + WIRE_SUFFIX: torch.arange(64.0)}
    saved = peft_method("dora").saved_state(state, base.config, source)
    assert saved.keys() == {Q + A_SUFFIX, Q + PEFT_SUFFIX}
    assert torch.allclose(saved[Q + PEFT_SUFFIX], weight.norm(dim=1) + torch.arange(64.0))
    assert torch.equal(saved[Q + A_SUFFIX], state[Q + A_SUFFIX])
    assert file_norms.cache_info().currsize >= 1  # read once, kept for the next rounds


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora", "fedex-lora"])
def test_strategies_that_rebuild_or_fold_factors_refuse_dora(strategy):
    with pytest.raises(SettingsError, match=r"cannot federate peft=dora; use strategy fedavg, "
                                            r"fedprox"):
        load({**DORA, "strategy": strategy, "client-ranks": "4,8"})


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    replies: list[dict] = []
    run_inprocess({**DORA, "output-dir": str(out)}, 2, hook=recording_hook(replies))
    return out, replies


def test_a_dora_federation_trains_and_sends_factors_and_offsets(dora_run):
    out, replies = dora_run
    rows = read_metrics(out)
    trained = training_rounds(rows)
    assert [r["clients-replied"] for r in trained] == [2, 2]
    assert trained[1]["train-loss"] < trained[0]["train-loss"]
    assert trained[1]["eval-loss"] < rows[0]["eval-loss"]
    assert all("exactness" in r for r in trained)  # of the B A part
    assert len(replies) == 4
    for state in replies:
        assert len(state) == 12  # 4 layers x (A, B, offset)
        assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1]
                for k in state} == {"lora_A", "lora_B", "lora_magnitude_offset"}
    assert any(float(v.abs().max()) > 0 for k, v in replies[0].items()
               if k.endswith(WIRE_SUFFIX))  # the magnitudes trained
    # 4 layers x (A 4 x 64, B d x 4, offset d), d = 64 (q) or 32 (v): float32 plus framing
    values = 2 * (4 * 64 + 64 * 4 + 64) + 2 * (4 * 64 + 32 * 4 + 32)
    assert sum(v.numel() for v in replies[0].values()) == values
    for row in trained:
        for client in row["clients"]:
            assert values * 4 <= client["bytes-up"] < values * 4 + 2048


def test_the_global_offsets_and_factors_are_the_example_weighted_means(dora_run):
    out, replies = dora_run
    last = training_rounds(read_metrics(out))[-1]
    weights = [c["weight"] for c in last["clients"]]  # the merge's (max-share)
    p = [w / sum(weights) for w in weights]
    tensors = read_latest(out).tensors
    scale = lora_scale(4, load(DORA)[0].lora.alpha, False)
    for key, merged in tensors.items():
        name = key.removeprefix("dense/").removeprefix("global/")
        if key.startswith("dense/"):
            expected = sum(pi * r[name].double() for pi, r in zip(p, replies[2:]))
        elif key.startswith("global/") and name.endswith(B_SUFFIX):  # stored in delta-W scale
            expected = scale * sum(pi * r[name].double() for pi, r in zip(p, replies[2:]))
        else:
            continue
        assert torch.allclose(merged.double(), expected, atol=1e-6), key


def test_the_dora_export_loads_with_peft_and_reproduces_the_global_model(dora_run):
    out, _ = dora_run
    tensors = read_latest(out).tensors
    scale = lora_scale(4, load(DORA)[0].lora.alpha, False)
    factors = unflatten({k.removeprefix("global/"): v for k, v in tensors.items()
                         if k.startswith("global/")})
    wire = {**to_peft(factors, scale), **{k.removeprefix("dense/"): v
                                          for k, v in tensors.items() if k.startswith("dense/")}}
    reference, _ = dora_model()
    peft_method("dora").set_state(reference, "d", wire)
    expected = reference.eval()(input_ids=IDS).logits  # eval: no LoRA dropout

    final = load_file(out / "final" / "adapter_model.safetensors")
    assert sum(k.endswith(PEFT_SUFFIX) for k in final) == 4
    assert not any(k.endswith(WIRE_SUFFIX) for k in final)
    fresh, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    plain = fresh(input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(fresh, str(out / "final"))
    assert loaded.peft_config["default"].use_dora
    tuned = loaded(input_ids=IDS).logits
    assert torch.allclose(tuned, expected, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-4)


def test_dora_federates_on_a_4bit_base(tmp_path):
    run_inprocess({**DORA, "output-dir": str(tmp_path), "quantization": "4bit",
                   "num-server-rounds": 1, "local-steps": 3, "fraction-evaluate": 0.0}, 2)
    assert [r["clients-replied"] for r in training_rounds(read_metrics(tmp_path))] == [2]
    settings = ModelSettings(name="tiny-llama", device="cpu", quantization="4bit")
    plain = load_model(settings)[0](input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(load_model(settings)[0], str(tmp_path / "final"))
    tuned = loaded(input_ids=IDS).logits
    assert tuned.shape == plain.shape and not torch.allclose(tuned, plain, atol=1e-4)


def test_lora_plus_gives_dora_s_b_the_ratio_and_its_magnitude_a_s_learning_rate():
    from fedlora.train.loop import param_groups, trainable_parameters

    model, _ = dora_model()
    groups = param_groups(model, trainable_parameters(model, "d"), 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    base, fast = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0]
    assert len(fast) == 4 and all(".lora_B." in n for n in fast)
    assert sum(".lora_magnitude_vector." in n for n in base) == 4
    assert sum(".lora_A." in n for n in base) == 4


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_a_robust_merge_merges_the_magnitude_offsets_by_its_rule(rule, tmp_path):
    """The offsets were never merged under median or trimmed-mean: the old ones were kept."""
    replies: list[dict] = []
    run_inprocess({**DORA, "output-dir": str(tmp_path), "robust": rule, "robust-f": 1,
                   "num-server-rounds": 1, "min-available-nodes": 3, "min-train-nodes": 3,
                   "min-replies": 3}, 3, hook=recording_hook(replies))
    dense = {k.removeprefix("dense/"): v for k, v in read_latest(tmp_path).tensors.items()
             if k.startswith("dense/")}
    assert dense and any(float(v.abs().max()) > 0 for v in dense.values())
    for name, merged in dense.items():  # 3 clients: the median is the middle value of each
        expected = torch.stack([r[name] for r in replies[-3:]]).median(dim=0).values
        assert torch.allclose(merged, expected.float(), atol=1e-7), name
