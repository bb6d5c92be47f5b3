"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than
in-context learning"): learned vectors that rescale the keys, the values and the input of
the feed-forward down-projection, through PEFT's IA3Config.

What a client trains and sends: one vector per adapted layer, (out, 1) for k_proj / v_proj and
(1, in) for down_proj on Llama-style models; all start at 1 (the base model), so the server
starts from ones too. There is no rank: LoRA's rank settings are refused.
"""

from __future__ import annotations

import torch
from peft import IA3Config, PeftModel
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PLACES

from fedlora.adapters.base import LORA_ONLY, PeftMethod, register_peft
from fedlora.adapters.lora import linear_module_names
from fedlora.config import LoraSettings

# modules whose *input* IA3 rescales (PEFT's feedforward_modules); the others: their output
FEEDFORWARD = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3")


@register_peft
class IA3(PeftMethod):
    """Rescaling vectors on keys, values and the FFN input (PEFT's IA3)."""

    name = "ia3"
    dp_sgd = "one-by-one"  # its vectors are ParameterDict entries no Opacus hook sees
    summary = "IA3: learned vectors rescaling keys, values and the FFN input (no rank)"
    unused = LORA_ONLY
    why_unused = "it learns rescaling vectors, not low-rank factors"

    def config(self, lora: LoraSettings, base_id: str | None = None) -> IA3Config:
        targets = lora.modules()
        if lora.all_linear:  # the default: PEFT's choice per architecture
            return IA3Config(task_type="CAUSAL_LM", base_model_name_or_path=base_id)
        return IA3Config(target_modules=targets,
                         feedforward_modules=[t for t in targets if t in FEEDFORWARD],
                         task_type="CAUSAL_LM", base_model_name_or_path=base_id)

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        check_places(model, lora)
        return super().add(model, lora, adapter)

    def dense_shapes(self, skeleton: torch.nn.Module, lora: LoraSettings
                     ) -> dict[str, tuple[int, ...]]:
        check_places(skeleton, lora)
        return super().dense_shapes(skeleton, lora)

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """Every vector at 1: the global model starts as the base model."""
        return {k: torch.ones(shape) for k, shape in shapes.items()}


def check_places(model: torch.nn.Module, lora: LoraSettings) -> None:
    """With all-linear, PEFT's IA3 places must exist for the model's architecture; else a
    ValueError that lists the model's linear modules to choose from."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if lora.all_linear and model_type not in PLACES:
        raise ValueError(
            f"setting 'target-modules': peft=ia3 has no default places for model type "
            f"{model_type!r}; name the key, value and feed-forward projections among its "
            f"linear modules {linear_module_names(model)}")
