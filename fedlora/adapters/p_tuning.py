"""P-tuning (Liu et al. 2021, "GPT understands, too"): a soft prompt computed by a small prompt
encoder (an MLP over `num-virtual-tokens` learned embeddings), through PEFT's
PromptEncoderConfig. The base model is untouched.

What a client trains and sends: the encoder's own weights (its embedding and MLP), keyed
`prompt_encoder.<name>`. Not PEFT's state dict: for P-tuning that holds the prompt the encoder
*computes*, and averaging computed prompts is not FedAvg of what the clients trained (the
MLP is not linear). The saved adapter is PEFT's format (the computed prompt, which PEFT loads
in inference mode), made from the global encoder (`fedlora.adapters.prompt_encoder`).
"""

from __future__ import annotations

from peft import PromptEncoderConfig
from peft.tuners.p_tuning import PromptEncoder

from fedlora.adapters.base import register_peft
from fedlora.adapters.prompt_encoder import EncoderMethod
from fedlora.config import LoraSettings


@register_peft
class PTuning(EncoderMethod):
    """A soft prompt computed by an MLP prompt encoder; its weights are federated."""

    name = "p-tuning"
    dp_sgd = "one-by-one"  # PEFT encodes the prompt once per batch and repeats it
    summary = "P-tuning: a soft prompt computed by an MLP prompt encoder (its weights federated)"
    why_unused = "it learns a prompt encoder, not weights of the model's layers"
    encoder = PromptEncoder

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PromptEncoderConfig:
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.tokens(lora),
                                   base_model_name_or_path=base_id)
