"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), through PEFT's
`LoraConfig(use_dora=True)`.

DoRA splits each adapted weight into a magnitude and a direction:
W' = m * (W0 + s B A) / ||W0 + s B A||, the norm taken over each output row. A client trains
B, A (as LoRA) and the magnitude vector m (one value per output row, initialised by PEFT to
the row norms of its own base weight, ||W0||, so the adapted model starts as the base model).

What crosses the wire: B and A, exactly as for LoRA, and for each adapted layer the
magnitude as an *offset* from the base's own row norms, m - ||W0|| (wire key
`<module>.lora_magnitude_offset`). The offsets start at zero everywhere, so the server needs
no base weights to start a run, and a client on a 4-bit base (whose dequantized W0 has
slightly different row norms from the full-precision W0) adds the averaged offset to its own
norms: every client starts each round from its own base exactly. The exported adapter is
PEFT's format (`lora_magnitude_vector` = the full-precision base's row norms + the global
offset; the server reads the base weights once for that), so `PeftModel.from_pretrained`
loads it.

Aggregation (fedavg, fedprox): B and A averaged as FedIT averages them, the offsets averaged
as plain tensors. Because m is averaged separately from the direction and the direction is
normalised, the global model is not the average of the clients' models even where
mean(B_i) mean(A_i) = mean(B_i A_i); the exactness figure measures the B A part only.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from peft.utils.integrations import dequantize_module_weight
from transformers.pytorch_utils import Conv1D

from fedlora.adapters.base import check_state, register_peft
from fedlora.adapters.lora import Lora, lora_config, target_shapes
from fedlora.config import LoraSettings

if TYPE_CHECKING:
    from fedlora.models import ModelSource

PEFT_SUFFIX = ".lora_magnitude_vector"  # PEFT's state-dict key of a layer's magnitude
WIRE_SUFFIX = ".lora_magnitude_offset"  # fedlora's: the magnitude minus the base's row norms


@register_peft
class Dora(Lora):
    """DoRA: LoRA's factors plus a per-row magnitude, federated as an offset from ||W0||."""

    name = "dora"
    # the magnitude layer is called with the base weight and the factors as arguments,
    # which Opacus cannot replay alone
    dp_sgd = "one-by-one"
    summary = "DoRA: LoRA factors plus a learned magnitude per output row (weight-decomposed)"

    def config(self, lora: LoraSettings, base_id: str | None = None) -> LoraConfig:
        config = lora_config(lora, base_id)
        config.use_dora = True
        return config

    def get_state(self, model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
        """B and A as PEFT keys them, and each magnitude as its offset from ||W0||."""
        return to_wire(super().get_state(model, adapter), base_norms(model))

    def set_state(self, model: PeftModel, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Load what `get_state` returns: each magnitude = this model's ||W0|| + its offset."""
        norms = base_norms(model)
        check_state(to_wire(super().get_state(model, adapter), norms), state)
        set_peft_model_state_dict(model, from_wire(state, norms), adapter_name=adapter)

    def dense_shapes(self, skeleton: torch.nn.Module, lora: LoraSettings
                     ) -> dict[str, tuple[int, ...]]:
        """One offset of length d (output rows) per adapted layer."""
        return {module + WIRE_SUFFIX: (d,)
                for module, (d, _) in sorted(target_shapes(skeleton, lora.modules()).items())}

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """Every offset zero: each machine's magnitude starts at its own base's row norms."""
        return {k: torch.zeros(shape) for k, shape in shapes.items()}

    def saved_state(self, state: dict[str, torch.Tensor], model_config: Any,
                    source: ModelSource) -> dict[str, torch.Tensor]:
        """PEFT's form: each offset back to a magnitude, on the full-precision base's row
        norms (read from the model's files once per process)."""
        modules = tuple(sorted(k.removesuffix(WIRE_SUFFIX) for k in state
                               if k.endswith(WIRE_SUFFIX)))
        return from_wire(state, file_norms(source.path, modules))


def to_wire(state: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    """PEFT's state -> the wire's: each magnitude vector becomes its offset from `norms`."""
    return _convert(state, PEFT_SUFFIX, WIRE_SUFFIX, lambda m, v: v.float() - norms[m])


def from_wire(state: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """The wire's state -> PEFT's: each offset becomes the magnitude `norms` + offset."""
    return _convert(state, WIRE_SUFFIX, PEFT_SUFFIX, lambda m, v: norms[m] + v.float())


def _convert(state: dict[str, torch.Tensor], old: str, new: str, value: Any
             ) -> dict[str, torch.Tensor]:
    """`state` with each key ending in `old` renamed to end in `new` and its tensor replaced
    by value(module, tensor); the other entries unchanged."""
    out = {}
    for key, tensor in state.items():
        module = key.removesuffix(old)
        out[module + new if key.endswith(old) else key] = (
            value(module, tensor) if key.endswith(old) else tensor)
    return out


def row_norms(weight: torch.Tensor, layer: torch.nn.Module | None = None) -> torch.Tensor:
    """||W||_2 of each output row (d,), in float32, as PEFT's DoRA computes its magnitude
    (the weight of a Conv1D `layer`, GPT-2's, is stored transposed: (k, d))."""
    rows = weight.T if isinstance(layer, Conv1D) else weight
    return torch.linalg.norm(rows.float(), dim=1)


def base_norms(model: PeftModel) -> dict[str, torch.Tensor]:
    """{module key: row norms of its frozen base weight} of every DoRA layer of `model`
    (a quantized weight dequantized first, as PEFT does), keyed as PEFT's state dict."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and hasattr(module, "base_layer"):
            with torch.no_grad():
                base = module.get_base_layer()
                out[name] = row_norms(dequantize_module_weight(base), base).cpu()
    return out


@functools.lru_cache(maxsize=4)
def file_norms(path: str, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Row norms of the named modules' weights in the model at `path` (a folder or hub id),
    loaded once on the CPU in its stored dtype."""
    from transformers import AutoModelForCausalLM

    from fedlora.models.builtin import quiet_progress

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    layers = dict(model.named_modules())
    try:
        named = {m: layers[m.removeprefix("base_model.model.")] for m in modules}
        return {m: row_norms(layer.weight.detach(), layer) for m, layer in named.items()}
    finally:
        del model, layers
