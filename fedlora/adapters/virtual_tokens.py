"""The forward pass of a model whose adapter adds virtual tokens: a soft prompt before every
input (prompt tuning, P-tuning) or learned keys and values at every layer (prefix tuning,
P-tuning v2), `n` positions in front of the real ones.

PEFT's own forward does this, but with a soft prompt its outputs cover the n virtual positions
as well, and its `generate` does not run with the transformers version fedlora uses. fedlora's
loss, its choice scoring and its generation call the base model directly, so they put the
virtual tokens in front themselves, here: `prompted` gives the base model's inputs (the prompt
as embeddings, or the prefixes as a key/value cache, and an attention mask that covers them)
and how many output positions to drop. Positions count from the virtual tokens, as in PEFT:
a text token's position is the same in training and in generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft import PeftModel, PeftType

from fedlora.adapters.base import LORA_ONLY, PeftMethod, PeftOptions, options_of
from fedlora.config import LoraSettings, require, setting


@dataclass(frozen=True)
class VirtualTokenOptions(PeftOptions):
    """The option every virtual-token method shares."""

    tokens: int = setting(
        "num-virtual-tokens", 20,
        "prompt-tuning, p-tuning, prefix-tuning, p-tuning-v2: length of the learned soft "
        "prompt or prefix, in tokens (>= 1).")

    def __post_init__(self) -> None:
        require(self.tokens >= 1, "num-virtual-tokens", "an integer >= 1", self.tokens)


class VirtualTokenMethod(PeftMethod):
    """A PEFT method that adds num-virtual-tokens positions (a prompt or prefixes), and adapts
    no weights of the model's layers."""

    Options: ClassVar[type[PeftOptions]] = VirtualTokenOptions
    unused = (*LORA_ONLY, "target-modules")

    def tokens(self, lora: LoraSettings) -> int:
        """num-virtual-tokens of this run."""
        return options_of(lora, VirtualTokenOptions).tokens


# soft prompts at the input, and prefixes at every layer
PROMPT_TYPES = (PeftType.PROMPT_TUNING, PeftType.P_TUNING)
PREFIX_TYPES = (PeftType.PREFIX_TUNING,)


def virtual_kind(model: torch.nn.Module) -> str | None:
    """"prompt", "prefix", or None when the active adapter adds no virtual tokens."""
    if not isinstance(model, PeftModel):
        return None
    peft_type = model.active_peft_config.peft_type
    return "prompt" if peft_type in PROMPT_TYPES else "prefix" if peft_type in PREFIX_TYPES \
        else None


def runner(model: torch.nn.Module) -> Any:
    """The model to call with `prompted`'s inputs: the base model when there are virtual
    tokens (they are in the inputs already), else the model itself."""
    return model.get_base_model() if virtual_kind(model) else model  # type: ignore[operator]


def prompted(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor | None = None) -> tuple[dict[str, Any], int]:
    """(keyword arguments for `runner(model)` or its decoder, positions to drop from its
    outputs): the input ids themselves when there are no virtual tokens. With `position_ids`
    (packed examples, `fedlora.data.format.pack`) the attention mask is left out and no cache
    made: transformers then keeps apart the spans whose positions restart; a model with
    virtual tokens cannot take them (`fedlora.data.format.unpacked` first)."""
    kind = virtual_kind(model)
    if position_ids is not None:
        if kind is not None:
            raise ValueError("packed examples (position_ids) cannot go through virtual "
                             "tokens; unpack the batch first (fedlora.data.format.unpacked)")
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}, 0
    if kind is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
    batch = input_ids.shape[0]
    config: Any = model.active_peft_config
    n = int(config.num_virtual_tokens)
    mask = torch.cat([attention_mask.new_ones((batch, n)), attention_mask], dim=1)
    if kind == "prefix":  # a fresh cache each call: a forward pass appends to it
        return {"input_ids": input_ids, "attention_mask": mask,
                "past_key_values": model.get_prompt(batch)}, 0  # type: ignore[operator]
    prompt = model.get_prompt(batch)  # type: ignore[operator]
    embeds = runner(model).get_input_embeddings()(input_ids)
    return {"inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": mask}, n


def generation_inputs(model: torch.nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[dict[str, Any], int]:
    """(keyword arguments for `runner(model).generate`, where the new tokens start in its
    output). A soft prompt: embeddings (transformers returns the new tokens only); prefixes:
    the cache, with n placeholder ids in front that stand for the cached positions."""
    inputs, _ = prompted(model, input_ids, attention_mask)
    kind = virtual_kind(model)
    if kind == "prompt":
        return inputs, 0
    if kind == "prefix":
        n = inputs["attention_mask"].shape[1] - input_ids.shape[1]
        inputs["input_ids"] = torch.cat([input_ids.new_zeros((input_ids.shape[0], n)),
                                         input_ids], dim=1)
        return inputs, inputs["input_ids"].shape[1]
    return inputs, input_ids.shape[1]


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  logits_to_keep: int | torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits at the input's own positions (virtual tokens dropped).
    `logits_to_keep` as transformers takes it (an int: the last k; a tensor: those positions
    of the input); None: not passed (every position, for models without it)."""
    inputs, skip = prompted(model, input_ids, attention_mask)
    call = runner(model)
    if isinstance(logits_to_keep, torch.Tensor):  # positions of the input: after a prompt
        return call(**inputs, logits_to_keep=logits_to_keep + skip).logits
    if logits_to_keep:  # the last k positions are the input's own
        return call(**inputs, logits_to_keep=logits_to_keep).logits
    return call(**inputs).logits[:, skip:]
