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

from fedlora.adapters.base import PEFT_METHODS, PeftMethod, register_peft
from fedlora.aggregation.base import Factors
from fedlora.config import LoraSettings
from fedlora.seeds import INIT_MIX, derive_seed

SAFETENSORS_NAME = "adapter_model.safetensors"


def lora_config(settings: LoraSettings, base_id: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig for these settings."""
    alpha: Any = settings.alpha  # PEFT annotates lora_alpha as int; a float works and is kept
    return LoraConfig(r=settings.rank, lora_alpha=alpha, lora_dropout=settings.dropout,
                      target_modules=settings.modules(), use_rslora=settings.use_rslora,
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


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (last path component) of the model's linear layers, sorted. A layer that
    a PEFT method already wraps counts as the layer it wraps; the method's own sub-layers
    (LoRA's A and B, an expert, a router, the wrapped base layer) do not count."""
    names: set[str] = set()
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w) for w in wrapped):  # inside a wrapped layer
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name + ".")
            names.add(name.rsplit(".", 1)[-1])
        elif isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head"})


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise a ValueError naming any target module the model does not have."""
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"setting 'target-modules': {missing} not found in the model; its "
                         f"linear modules are {available} (or use all-linear)")


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
    check_target_modules(model, targets)
    return {f"base_model.model.{name}": (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}


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
