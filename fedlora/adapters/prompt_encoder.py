"""What P-tuning and prefix tuning share: a trained prompt *encoder* whose weights are
federated, and a saved adapter that holds what the encoder computes.

For these methods PEFT's state dict holds the encoder's output (the prompt, or the prefix of
keys and values), not its trainable weights, and averaging outputs is not FedAvg of what the
clients trained (the encoder is not linear). So a client sends the encoder's parameters,
keyed `prompt_encoder.<name>`; the server averages them; `saved_state` runs the global encoder
once to write PEFT's own format (which `PeftModel.from_pretrained` loads in inference mode).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import PeftModel
from peft.utils.other import _prepare_prompt_learning_config

from fedlora.adapters.base import check_state
from fedlora.adapters.prompt_tuning import INIT_STD, KEY
from fedlora.adapters.virtual_tokens import VirtualTokenMethod
from fedlora.config import LoraSettings
from fedlora.seeds import INIT_MIX, derive_seed

if TYPE_CHECKING:
    from fedlora.models import ModelSource

PREFIX = "prompt_encoder."  # wire keys: prompt_encoder.embedding.weight, ...


class EncoderMethod(VirtualTokenMethod):
    """A PEFT prompt-learning method whose encoder weights are federated."""

    encoder: ClassVar[Any] = None  # PEFT's encoder class, built from a prepared config

    def get_state(self, model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
        encoder = model.prompt_encoder[adapter]
        return {PREFIX + n: p.detach().clone() for n, p in encoder.named_parameters()}

    def set_state(self, model: PeftModel, adapter: str, state: dict[str, torch.Tensor]) -> None:
        check_state(self.get_state(model, adapter), state)
        params = dict(model.prompt_encoder[adapter].named_parameters())
        with torch.no_grad():
            for key, tensor in state.items():
                params[key.removeprefix(PREFIX)].copy_(tensor)

    def dense_shapes(self, skeleton: torch.nn.Module, lora: LoraSettings
                     ) -> dict[str, tuple[int, ...]]:
        model = self.add(skeleton, lora, "shapes")  # meta tensors: shapes only
        return {k: tuple(v.shape) for k, v in sorted(self.get_state(model, "shapes").items())}

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """Seeded per tensor: the virtual-token embeddings N(0, 0.02^2) (as prompt tuning's
        prompt); each linear layer U(-1/sqrt(in), 1/sqrt(in)) (torch's default bound), its
        bias zero."""
        out = {}
        for key, shape in shapes.items():
            gen = torch.Generator().manual_seed(derive_seed(seed, key, mix=INIT_MIX))
            if key.endswith("embedding.weight"):
                out[key] = torch.randn(shape, generator=gen) * INIT_STD
            elif key.endswith(".bias"):
                out[key] = torch.zeros(shape)
            else:
                bound = 1.0 / math.sqrt(shape[-1])
                out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        return out

    def saved_state(self, state: dict[str, torch.Tensor], model_config: Any,
                    source: ModelSource) -> dict[str, torch.Tensor]:
        """PEFT's saved form: what the global encoder computes for its virtual tokens."""
        tokens = state[PREFIX + "embedding.weight"].shape[0]
        config = self.config(LoraSettings(peft=self.name, options={"num-virtual-tokens": tokens}))
        config = _prepare_prompt_learning_config(config, model_config)
        config.num_transformer_submodules = 1  # a causal LM (PeftModel sets it likewise)
        encoder = self.encoder(config)
        encoder.load_state_dict({k.removeprefix(PREFIX): v.float() for k, v in state.items()})
        with torch.no_grad():
            return {KEY: encoder(torch.arange(tokens)).detach()}
