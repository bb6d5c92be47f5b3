"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
a small MLP after the attention output projection and after the FFN output of every layer,
output = h + up(gelu(down(h))) with h the wrapped projection's output.

PEFT 0.21 has no such method and AdapterHub's `adapters` needs transformers 4.x, so this file
is both halves: a PEFT method (config + layer + tuner, registered as PEFT type `BOTTLENECK`,
so that `get_peft_model`, PEFT's state dicts, `save_pretrained` and `PeftModel.from_pretrained`
work once `fedlora.adapters` is imported) and fedlora's `peft = "adapter"`.

What a client trains and sends: for each adapted projection with output width d, down (s, d)
with its bias (s,), and up (d, s) with its bias (d,), s = `adapter-size`. On Llama-style
models the default targets are o_proj and down_proj (Houlsby's two places per layer). Every
machine starts from the same seeded down-projection and a zero up-projection, so round 0 is
the base model. The adapter's weights stay float32 on a 4-bit or bf16 base (the base output
is cast for them and their output back). The adapter is nonlinear in h: it cannot be merged
into the base weights, so `fedlora export` refuses it with the reason. Gradient checkpointing
works (the adapters are plain modules inside each layer; a test compares the gradients).

GELU, not ReLU: Houlsby's reference code (google-research/adapter-bert, `feedforward_adapter`)
uses GELU; and while up is still near zero, a ReLU would pass nothing (and get no gradient)
for the negative half of down's outputs, where GELU still passes a small signal.
64 wide by default (`adapter-size`): the reference code's default and the paper's fixed-size
setting ("Adapters (64)"). On SmolLM2 that is 1.8x rank-8 LoRA's parameters; 32 is about
LoRA's, 16 about half (docs/peft-methods.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from fedlora.adapters.base import (
    LORA_ONLY,
    LayerTuner,
    PeftMethod,
    PeftOptions,
    add_peft_type,
    options_of,
    register_peft,
    register_tuner,
)
from fedlora.adapters.lora import check_target_modules
from fedlora.config import LoraSettings, require, setting
from fedlora.seeds import INIT_MIX, derive_seed

PREFIX = "bottleneck_"  # PEFT's prefix of the method: parameter names bottleneck_down/_up
DOWN, UP = PREFIX + "down", PREFIX + "up"
# Houlsby's places on Llama-style models: after attention (o_proj) and after the FFN (down_proj)
HOULSBY_TARGETS = ["o_proj", "down_proj"]
DEFAULT_TARGETS = {model_type: HOULSBY_TARGETS for model_type in (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
    "granite", "smollm3")}
# ... and on other architectures, by their names (GPT-2 calls both projections c_proj)
DEFAULT_TARGETS |= {"opt": ["out_proj", "fc2"], "gpt2": ["c_proj"],
                    "gpt_neox": ["dense", "dense_4h_to_h"], "falcon": ["dense", "dense_4h_to_h"]}


BOTTLENECK = add_peft_type("BOTTLENECK")


# ---- PEFT's half: config, layer, tuner -------------------------------------------------------

@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (Houlsby et al. 2019) on a model's projections."""

    bottleneck_size: int = field(default=64, metadata={
        "help": "Width of each adapter's hidden layer: down maps the projection's d outputs to "
                "this many, up maps them back (64: Houlsby et al.'s fixed size)."})
    target_modules: set[str] | list[str] | str | None = field(default=None, metadata={
        "help": "Names (or a regex) of the modules whose output gets an adapter; None = the "
                "default for the architecture (o_proj and down_proj on Llama-style models)."})
    init_weights: bool = field(default=True, metadata={
        "help": "Zero the up-projection, so that the adapted model starts as the base model; "
                "False draws it as a Linear layer does (for tests)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"BottleneckConfig.bottleneck_size: expected an integer >= 1 (the "
                             f"adapter's hidden width), got {size!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("BottleneckConfig.target_modules: expected module names, a regex or "
                             "None (the architecture's default), got an empty one")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A projection with bottleneck adapters on its output: h + up(gelu(down(h))) per adapter."""

    adapter_layer_names = (DOWN, UP)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig
                 ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        base = self.get_base_layer()  # GPT-2's Conv1D names its output width nf
        out_features = base.nf if isinstance(base, Conv1D) else getattr(base, "out_features",
                                                                         None)
        if not isinstance(out_features, int):
            raise TypeError(f"a bottleneck adapter wraps a linear layer (one with out_features), "
                            f"got {type(self.get_base_layer()).__name__}; choose linear "
                            f"target_modules")
        self.out_features = out_features
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Add adapter `adapter_name`: float32, on the base weight's device (meta included)."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        device = weight.device if weight is not None else next(base.parameters()).device
        d, size = self.out_features, config.bottleneck_size
        down = nn.Linear(d, size, device=device, dtype=torch.float32)  # (s, d)
        up = nn.Linear(size, d, device=device, dtype=torch.float32)  # (d, s)
        with torch.no_grad():  # down keeps Linear's init, U(-1/sqrt(d), 1/sqrt(d)); bias zero
            down.bias.zero_()
            if config.init_weights:  # up zero: the adapted model starts as the base model
                up.weight.zero_()
                up.bias.zero_()
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus each active adapter's, each computed from the base output."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out = result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            h = self._cast_input_dtype(result, next(down.parameters()).dtype)  # bf16 -> fp32
            out = out + up(F.gelu(down(h))).to(result.dtype)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: the adapter is nonlinear in the layer's output, no weight can hold it."""
        raise ValueError("a bottleneck adapter (h + up(gelu(down(h)))) is nonlinear in the "
                         "layer's output, so no weight of the base model can hold it and it "
                         "cannot be merged; use it as an adapter (PeftModel.from_pretrained, "
                         "fedlora generate --adapter)")

    def unmerge(self) -> None:
        """Nothing to undo: a bottleneck adapter is never merged."""

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(LayerTuner):
    """PEFT's tuner of bottleneck adapters: wraps each target module in a BottleneckLayer."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    config_cls = BottleneckConfig
    target_module_mapping = DEFAULT_TARGETS

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict
                                ) -> PeftConfig:
        config: BottleneckConfig = self.checked(peft_config)
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    f"BottleneckConfig.target_modules: no default for model type {model_type!r} "
                    f"(there is one for {', '.join(sorted(DEFAULT_TARGETS))}); name the "
                    f"attention output and FFN output projections of your model")
            config.target_modules = set(DEFAULT_TARGETS[model_type])
        return config


register_tuner("bottleneck", BottleneckConfig, BottleneckModel, PREFIX)


# ---- fedlora's half: peft = "adapter" --------------------------------------------------------

@dataclass(frozen=True)
class BottleneckOptions(PeftOptions):
    """peft=adapter's own setting."""

    size: int = setting("adapter-size", 64,
                        "adapter: width of each bottleneck adapter's hidden layer (the "
                        "bottleneck), >= 1.")

    def __post_init__(self) -> None:
        require(self.size >= 1, "adapter-size", "an integer >= 1", self.size)


@register_peft
class Bottleneck(PeftMethod):
    """Houlsby bottleneck adapters after attention and the FFN, adapter-size wide."""

    name = "adapter"
    dp_sgd = "opacus"  # its down and up projections: Linear modules
    summary = ("bottleneck adapters (Houlsby): a small MLP after attention and the FFN "
               "(adapter-size)")
    unused = LORA_ONLY
    why_unused = "it trains bottleneck adapters, not low-rank factors"
    Options = BottleneckOptions

    def config(self, lora: LoraSettings, base_id: str | None = None) -> BottleneckConfig:
        # all-linear: Houlsby's places for the architecture
        return BottleneckConfig(bottleneck_size=options_of(lora, BottleneckOptions).size,
                                target_modules=None if lora.all_linear else lora.modules(),
                                task_type="CAUSAL_LM", base_model_name_or_path=base_id)

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        if not lora.all_linear:  # a clear error for a name the model lacks
            check_target_modules(model, lora.modules())
        return super().add(model, lora, adapter)

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """down.weight drawn as a Linear's, U(-1/sqrt(d), 1/sqrt(d)), from a generator seeded by
        (seed, key); its bias and all of up zero: the global model starts as the base model."""
        out = {}
        for key, shape in shapes.items():
            if key.endswith(f".{DOWN}.weight"):
                gen = torch.Generator().manual_seed(derive_seed(seed, key, mix=INIT_MIX))
                bound = 1.0 / math.sqrt(shape[1])  # shape (s, d)
                out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            elif key.endswith((f".{DOWN}.bias", f".{UP}.weight", f".{UP}.bias")):
                out[key] = torch.zeros(shape)
            else:
                raise ValueError(f"{key}: expected a bottleneck adapter's tensor (…{DOWN}.weight "
                                 f"/ .bias, …{UP}.weight / .bias), got another key")
        return out
