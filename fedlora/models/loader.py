"""Load a base causal LM and its tokenizer, optionally quantized, on the chosen device."""

from __future__ import annotations

import torch

from fedlora.config import ModelSettings
from fedlora.models import prequantized
from fedlora.models.builtin import quiet_progress
from fedlora.models.quantization import bnb_config
from fedlora.models.source import ModelLoadError, ModelSource, resolve_source

SHARD_FILL = 0.9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; CUDA requests are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but no CUDA GPU is visible to torch "
                             f"(torch {torch.__version__}); use device=cpu or device=auto")
    return device


def resolve_dtype(compute_dtype: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 on the CPU."""
    if compute_dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[compute_dtype]


def placement(settings: ModelSettings, device: str) -> dict:
    """from_pretrained's placement: the whole model on `device`, or with `shard` split
    evenly (accelerate's device_map="balanced") across the CUDA devices of `devices`, each
    filled to at most SHARD_FILL of its memory (the rest is for activations)."""
    if not settings.shard:
        return {"device_map": {"": device}}
    from fedlora.devices import resolve

    devices = resolve(settings.devices, settings.device, torch.cuda.device_count())
    if len(devices) < 2 or not all(d.startswith("cuda:") for d in devices):
        raise ModelLoadError(f"shard=true splits the model across two or more CUDA devices, "
                             f"but devices={settings.devices!r} gives {devices} here; list "
                             f"them (--devices 0,1) or drop --shard")
    indices = [int(d[5:]) for d in devices]
    memory = {i: int(torch.cuda.get_device_properties(i).total_memory * SHARD_FILL)
              for i in indices}
    return {"device_map": "balanced", "max_memory": memory}


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(settings: ModelSettings, source: ModelSource | None = None):
    """Return (model, tokenizer, source) for the settings; the model's weights are frozen."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(settings.name)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.compute_dtype, device)
    kwargs = {"dtype": dtype, **placement(settings, device)}
    quant = bnb_config(settings.quantization, dtype)
    path, save_as = source.path, None
    if quant is not None:
        name = prequantized.cache_name(source, settings.quantization, quant, dtype, device)
        cached = prequantized.cached_copy(name)
        if cached:  # its config.json carries this very quantization config (part of the key)
            path = str(cached)
        else:
            kwargs["quantization_config"], save_as = quant, name
    try:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load model {settings.name!r} from {path}: "
                             f"{err}") from err
    if save_as is not None:  # quantized just now: keep the result for the next load
        prequantized.save_copy(model, save_as)
    model.requires_grad_(False)
    keep_4bit_differentiable(model)
    return model, load_tokenizer(source), source


def keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On a CPU with AVX512-BF16, a
    Linear4bit's first eval-mode forward without gradients (an evaluation) repacks its weight
    for an inference kernel that has no backward, for good: training after it silently lost
    the gradient through every base weight to the layer's input (torch warned "an autograd
    kernel was not registered ... gemv_4bit"). fedlora evaluates and trains the same cached
    model, so its loads keep bitsandbytes' differentiable path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]


def model_skeleton(source: ModelSource) -> torch.nn.Module:
    """The model's structure on the meta device: no weights are read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
