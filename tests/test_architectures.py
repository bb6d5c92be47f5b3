"""target-modules=all-linear on architectures other than Llama: tiny random OPT, GPT-2 (its
Conv1D layers), Phi-3 (fused projections) and Qwen2 built in code, each federated for one
round by two in-process clients; the final adapter loads with PeftModel.from_pretrained."""

from __future__ import annotations

import pytest
import torch
from fake_grid import run_inprocess
from peft import PeftModel
from safetensors.torch import load_file
from tiny_archs import ARCHITECTURES, build_tiny
from transformers import AutoModelForCausalLM

from fedlora.adapters import (
    add_lora,
    check_target_modules,
    linear_module_names,
    peft_method,
    target_names,
    target_shapes,
)
from fedlora.config import LoraSettings
from fedlora.methods import load_settings
from fedlora.models import model_skeleton, resolve_source
from fedlora.outputs import read_metrics, training_rounds

RUN = {"device": "cpu", "num-server-rounds": 1, "local-steps": 3, "lr": 0.05,
       "dataset-size": 40, "eval-examples": 8, "fraction-evaluate": 0.0,
       "min-available-nodes": 2}
# the layers all-linear adapts, by short name: every linear layer but the output head
LINEAR = {"opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
          "gpt2": ["c_attn", "c_fc", "c_proj"],
          "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
          "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
PER_BLOCK = {"opt": 6, "gpt2": 4, "phi3": 4, "qwen2": 7}  # GPT-2 has c_proj in attention and MLP
IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{architecture: folder of its tiny random model}."""
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_linear_resolves_every_linear_layer_but_the_head_as_peft_does(arch, tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    assert linear_module_names(model) == LINEAR[arch]
    names = target_names(model, ["all-linear"])
    assert len(names) == 2 * PER_BLOCK[arch] and not any("lm_head" in n for n in names)
    peft = add_lora(model, LoraSettings(rank=4, target_modules="all-linear"))
    assert set(peft.peft_config["default"].target_modules) == set(names)  # PEFT's own choice


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_server_shapes_from_the_skeleton_are_the_lora_factor_shapes(arch, tiny_dirs):
    """The server's (d, k) per layer, read from a meta skeleton (GPT-2's Conv1D stores its
    weight transposed), are those of the factors PEFT makes: B (d, r), A (r, k)."""
    shapes = target_shapes(model_skeleton(resolve_source(str(tiny_dirs[arch]))), ["all-linear"])
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]),
                     LoraSettings(rank=4, target_modules="all-linear"))
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(state) == 2 * len(shapes)
    for module, (d, k) in shapes.items():
        assert state[f"{module}.lora_B.default.weight"].shape == (d, 4)
        assert state[f"{module}.lora_A.default.weight"].shape == (4, k)


def test_a_name_the_model_lacks_lists_the_names_it_has(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["opt"])
    with pytest.raises(ValueError, match=r"\['gate_proj'\] not found.*"
                                         r"\['fc1', 'fc2', 'k_proj', 'out_proj'.*all-linear"):
        check_target_modules(model, ["q_proj", "gate_proj"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_clients_federate_all_linear_and_the_adapter_loads_in_peft(arch, tiny_dirs,
                                                                       tmp_path):
    run_inprocess({**RUN, "model": str(tiny_dirs[arch]), "lora-rank": 4,
                   "output-dir": str(tmp_path)}, 2)
    assert [r["clients-replied"] for r in training_rounds(read_metrics(tmp_path))] == [2]
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved} == set(LINEAR[arch])
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B" in k)  # it trained
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    plain = base(input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]),
                                       str(tmp_path / "final"))
    tuned = loaded(input_ids=IDS).logits
    assert tuned.shape == plain.shape and not torch.allclose(tuned, plain, atol=1e-5)


def test_dora_on_gpt2_conv1d_reads_the_norms_of_output_rows(tiny_dirs):
    """GPT-2's Conv1D stores W transposed: DoRA's magnitude starts at ||W0|| per output row
    (PEFT's own), so every offset fedlora sends starts at zero, square layers included."""
    from fedlora.adapters.dora import WIRE_SUFFIX

    dora = peft_method("dora")
    model = dora.add(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]),
                     LoraSettings(rank=4, peft="dora"), "default")
    offsets = {k: v for k, v in dora.get_state(model, "default").items()
               if k.endswith(WIRE_SUFFIX)}
    assert len(offsets) == 8 and all(v.abs().max() < 1e-5 for v in offsets.values())


@pytest.mark.parametrize("method,options", [("dora", {"lora-rank": 4}),
                                            ("adapter", {"adapter-size": 8})])
def test_methods_fedlora_builds_itself_federate_on_gpt2_conv1d(method, options, tiny_dirs,
                                                               tmp_path):
    run_inprocess({**RUN, "model": str(tiny_dirs["gpt2"]), "peft": method, **options,
                   "output-dir": str(tmp_path)}, 2)
    assert [r["clients-replied"] for r in training_rounds(read_metrics(tmp_path))] == [2]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]),
                                       str(tmp_path / "final"))
    assert loaded(input_ids=IDS).logits.shape == (1, IDS.shape[1], 320)


def test_lora_moe_experts_on_gpt2_conv1d_take_its_in_and_out_widths(tiny_dirs):
    """c_attn: Conv1D(nf=96, nx=32), its weight stored (32, 96): each expert's A is (r, 32),
    its B (96, r), and the adapted model runs."""
    moe = peft_method("lora-moe")
    lora = load_settings({"peft": "lora-moe", "lora-rank": 2}, {}).lora
    model = moe.add(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), lora, "default")
    state = moe.get_state(model, "default")
    layer = "base_model.model.transformer.h.0.attn.c_attn"
    assert tuple(state[f"{layer}.moe_A.0.weight"].shape) == (2, 32)
    assert tuple(state[f"{layer}.moe_B.0.weight"].shape) == (96, 2)
    assert tuple(state[f"{layer}.moe_router.weight"].shape)[1] == 32
    assert model(input_ids=IDS).logits.shape == (1, IDS.shape[1], 320)


def test_ia3_without_peft_places_for_the_architecture_lists_the_linear_modules(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi3"])
    with pytest.raises(ValueError, match=r"peft=ia3 has no default places for model type "
                                         r"'phi3'.*\['down_proj', 'gate_up_proj', 'o_proj', "
                                         r"'qkv_proj'\]"):
        peft_method("ia3").add(model, LoraSettings(peft="ia3"), "default")
