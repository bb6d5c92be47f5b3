"""LoRA through PEFT: inject, read and write only the low-rank factors, export in PEFT format.

The wire keys are exactly the keys of `get_peft_model_state_dict` (adapter name removed),
for example `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from fedlora.adapters.base import PEFT_METHODS, PeftMethod, register_peft
from fedlora.aggregation.base import Factors
from fedlora.config import ALL_LINEAR, LoraSettings
from fedlora.seeds import INIT_MIX, derive_seed

SAFETENSORS_NAME = "adapter_model.safetensors"


def lora_config(settings: LoraSettings, base_id: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig for these settings."""
    alpha: Any = settings.alpha  # PEFT annotates lora_alpha as int; a float works and is kept
    # all-linear goes to PEFT as its own shorthand: PEFT resolves it on whatever base it meets
    targets: Any = ALL_LINEAR if settings.all_linear else settings.modules()
    return LoraConfig(r=settings.rank, lora_alpha=alpha, lora_dropout=settings.dropout,
                      target_modules=targets, use_rslora=settings.use_rslora,
                      task_type="CAUSAL_LM", base_model_name_or_path=base_id)


@register_peft
class Lora(PeftMethod):
    """LoRA (Hu et al. 2021), and QLoRA on a 4-bit base: delta W = (alpha / r) B A on the
    target modules; the factors are federated by the strategies of `fedlora.methods`."""

    name = "lora"
    dp_sgd = "opacus"  # lora_A, lora_B: Linear modules
    summary = "LoRA: low-rank factors B, A on the target modules (QLoRA on a 4-bit base)"
    low_rank = True

    def config(self, lora: LoraSettings, base_id: str | None = None) -> LoraConfig:
        return lora_config(lora, base_id)

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        check_target_modules(model, lora.modules())
        return super().add(model, lora, adapter)


LORA = PEFT_METHODS["lora"]


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{full name: layer} of the model's linear layers, by PEFT's all-linear rule: every
    nn.Linear (bitsandbytes' 4-bit and 8-bit layers are ones) and transformers' Conv1D (GPT-2),
    and every PEFT layer wrapping one, but not the output head nor a PEFT layer's own parts
    (LoRA's A and B, an expert, a router, the wrapped base layer)."""
    head_of = getattr(model, "get_output_embeddings", None)
    head = head_of() if callable(head_of) else None
    layers: dict[str, torch.nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if module is head or any(name.startswith(w) for w in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name + ".")
            if "Linear" in type(module).__name__ or isinstance(
                    module.get_base_layer(), (torch.nn.Linear, Conv1D)):
                layers[name] = model.get_submodule(name)  # the same object, typed as a Module
        elif isinstance(module, (torch.nn.Linear, Conv1D)):
            layers[name] = module
    return layers


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (last path component) of the model's linear layers (`linear_layers`),
    sorted: what target-modules may name."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)} - {"lm_head"})


def target_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the layers that `targets` (short names, or [ALL_LINEAR]) adapt in
    `model`, in the model's order; a ValueError names a target the model lacks."""
    check_target_modules(model, targets)
    layers = linear_layers(model)
    if targets == [ALL_LINEAR]:
        return list(layers)
    return [name for name in layers if name.rsplit(".", 1)[-1] in targets]


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise a ValueError naming any target module the model does not have (with
    all-linear: a model without linear layers)."""
    available = linear_module_names(model)
    if targets == [ALL_LINEAR]:
        if not available:
            raise ValueError(f"setting 'target-modules': all-linear found no linear layer in "
                             f"the model ({type(model).__name__}); name its modules instead")
        return
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"setting 'target-modules': {missing} not found in the model "
                         f"({type(model).__name__}); its linear modules are {available}: name "
                         f"some of them, or use all-linear for every one")


def add_lora(model: torch.nn.Module, settings: LoraSettings,
             adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a LoRA adapter, or add one more adapter to an existing PeftModel."""
    check_target_modules(model, settings.modules())
    config = lora_config(settings)  # the exported config records the base id, not this one
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


def get_lora_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Only the low-rank factors of one adapter, detached copies, keyed by the wire keys
    (`PeftMethod.get_state`)."""
    return LORA.get_state(model, adapter_name)


def set_lora_state(model: PeftModel, state: dict[str, torch.Tensor],
                   adapter_name: str = "default") -> None:
    """Load factors into one adapter; keys and shapes must match exactly."""
    LORA.set_state(model, adapter_name, state)


def target_shapes(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """{module: (d, k)} of the layers LoRA adapts, keyed as PEFT's state dict names them.

    Works on a meta-device skeleton, so the server never loads base weights to learn shapes.
    """
    layers = linear_layers(model)
    return {f"base_model.model.{name}": layer_shape(layers[name])
            for name in target_names(model, targets)}


def layer_shape(layer: torch.nn.Module) -> tuple[int, int]:
    """(d, k) = (out, in) of a linear layer: LoRA's B is (d, r) and A (r, k). A Conv1D
    (GPT-2) stores its weight transposed, (k, d), and names them nf = d, nx = k."""
    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    if isinstance(base, Conv1D):
        return int(base.nf), int(base.nx)
    linear: Any = base  # an nn.Linear (bitsandbytes' layers are ones)
    return int(linear.out_features), int(linear.in_features)


def shared_init(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Factors:
    """Seeded initial factors, the same on every machine: A as PEFT draws it, B zero.

    A ~ U(-1/sqrt(k), 1/sqrt(k)) (PEFT's kaiming_uniform(a=sqrt(5))) from a generator seeded by
    (seed, module name), filled row by row: the rank-r init is the first r rows of any larger
    one, which is what lets ffa-lora clients of different ranks share one frozen A.
    """
    factors: Factors = {}
    for module, (d, k) in shapes.items():
        gen = torch.Generator().manual_seed(derive_seed(seed, module, mix=INIT_MIX))
        bound = 1.0 / math.sqrt(k)
        a = (torch.rand((rank, k), generator=gen) * 2 - 1) * bound  # (rank, k)
        factors[module] = (torch.zeros(d, rank), a)
    return factors


def save_adapter(state: dict[str, torch.Tensor], config: PeftConfig, out_dir: Path,
                 extra: dict | None = None) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.inference_mode = True
    config.save_pretrained(str(out_dir))
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    if extra:
        (out_dir / "fedlora.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out_dir
