"""Prompt tuning (Lester et al. 2021, "The power of scale for parameter-efficient prompt
tuning"): `num-virtual-tokens` learned input embeddings put before every input, through
PEFT's PromptTuningConfig. The base model is untouched; the soft prompt is all that trains.

What a client trains and sends: one (num-virtual-tokens, hidden) tensor, PEFT's
`prompt_embeddings`. Every machine starts from the same seeded prompt, N(0, 0.02^2) (0.02: the
`initializer_range` of Llama-style models; PEFT's default draws N(0, 1), seven times the size
of SmolLM2's token embeddings). fedlora's loss, choice scoring and generation put the
prompt first themselves (`fedlora.adapters.virtual_tokens`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from peft import PromptTuningConfig

from fedlora.adapters.base import register_peft
from fedlora.adapters.virtual_tokens import VirtualTokenMethod
from fedlora.config import LoraSettings
from fedlora.seeds import INIT_MIX, derive_seed

KEY = "prompt_embeddings"  # PEFT's state-dict key of a soft prompt
INIT_STD = 0.02


class PromptTable(VirtualTokenMethod):
    """A method whose one federated tensor is PEFT's table of virtual-token vectors
    (`prompt_embeddings`: the prompt encoder's embedding weight), sent as it is."""

    init_salt: ClassVar[int] = 0  # each method's own seeded start

    def dense_shapes(self, skeleton: torch.nn.Module, lora: LoraSettings
                     ) -> dict[str, tuple[int, ...]]:
        """The table's shape, read off the parameter (PEFT's state dict reads values, which a
        meta-device skeleton does not have)."""
        model: Any = self.add(skeleton, lora, "shapes")
        return {KEY: tuple(model.prompt_encoder["shapes"].embedding.weight.shape)}

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(derive_seed(seed, self.init_salt, mix=INIT_MIX))
        return {k: torch.randn(shape, generator=gen) * INIT_STD for k, shape in shapes.items()}


@register_peft
class PromptTuning(PromptTable):
    """A soft prompt of num-virtual-tokens embeddings before the input."""

    name = "prompt-tuning"
    dp_sgd = "one-by-one"  # PEFT embeds the prompt once per batch and repeats it
    summary = "prompt tuning: a learned soft prompt before the input (num-virtual-tokens)"
    why_unused = "it learns a soft prompt, not weights of the model's layers"
    init_salt = 1

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PromptTuningConfig:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.tokens(lora),
                                  base_model_name_or_path=base_id)
