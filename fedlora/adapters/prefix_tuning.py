"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned keys and values
for `num-virtual-tokens` prefix positions in the attention of *every* layer, through PEFT's
PrefixTuningConfig. The base model is untouched.

The two differ only in the reparameterisation, which is PEFT's `prefix_projection`:

- `prefix-tuning` (prefix_projection=True, as in the paper): an MLP (embedding -> Linear ->
  tanh -> Linear) computes the prefixes; its weights are what a client trains and sends (as
  P-tuning's encoder, `fedlora.adapters.prompt_encoder`), and the saved adapter holds the
  prefixes it computes;
- `p-tuning-v2` (prefix_projection=False): the prefixes themselves are the parameters, one
  (num-virtual-tokens, layers x 2 x kv-dim) tensor, PEFT's `prompt_embeddings`, sent as it is.

fedlora's loss, choice scoring and generation pass the prefixes to the base model as a key /
value cache (`fedlora.adapters.virtual_tokens`). PEFT's prefix methods do not run with
gradient checkpointing, so it is refused.
"""

from __future__ import annotations

from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder

from fedlora.adapters.base import register_peft
from fedlora.adapters.prompt_encoder import EncoderMethod
from fedlora.adapters.prompt_tuning import PromptTable
from fedlora.adapters.virtual_tokens import VirtualTokenMethod
from fedlora.config import LoraSettings, Settings, SettingsError


class Prefixes(VirtualTokenMethod):
    """What both prefix methods refuse and ignore."""

    why_unused = "it learns prefixes for every layer, not weights of the model's layers"

    def check_settings(self, settings: Settings) -> None:
        super().check_settings(settings)
        if settings.train.gradient_checkpointing:
            raise SettingsError(
                f"setting 'gradient-checkpointing': peft={self.name} passes its prefixes to "
                f"every layer as a key/value cache, which PEFT does not combine with gradient "
                f"checkpointing; set gradient-checkpointing=false")

    def prefix_config(self, lora: LoraSettings, projection: bool, base_id: str | None
                      ) -> PrefixTuningConfig:
        """PEFT's prefix-tuning config, with or without the MLP reparameterisation."""
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.tokens(lora),
                                  prefix_projection=projection, base_model_name_or_path=base_id)


@register_peft
class PrefixTuning(Prefixes, EncoderMethod):
    """Prefixes at every layer, computed by an MLP whose weights are federated."""

    name = "prefix-tuning"
    dp_sgd = "opacus"  # the prefixes are computed per example
    summary = "prefix tuning: keys/values at every layer from an MLP (its weights federated)"
    encoder = PrefixEncoder

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PrefixTuningConfig:
        return self.prefix_config(lora, True, base_id)


@register_peft
class PTuningV2(Prefixes, PromptTable):
    """Prefixes at every layer, trained directly (no reparameterisation)."""

    name = "p-tuning-v2"
    dp_sgd = "opacus"  # the prefixes are computed per example
    summary = "P-tuning v2: keys/values at every layer, trained directly (no MLP)"
    init_salt = 2  # the prefix table, PEFT's `prompt_embeddings`, is sent as it is

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PrefixTuningConfig:
        return self.prefix_config(lora, False, base_id)
