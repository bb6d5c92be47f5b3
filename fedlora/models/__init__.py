"""Base models: built-ins, local folders, GGUF files, hub ids; quantization (bitsandbytes)."""

from fedlora.models.builtin import BUILTINS, cache_root
from fedlora.models.loader import (
                                   load_model,
                                   load_tokenizer,
                                   model_skeleton,
                                   resolve_device,
                                   resolve_dtype,
)
from fedlora.models.source import ModelLoadError, ModelSource, resolve_source

__all__ = ["BUILTINS", "ModelLoadError", "ModelSource", "cache_root", "load_model",
           "load_tokenizer", "model_skeleton", "resolve_device", "resolve_dtype", "resolve_source"]
