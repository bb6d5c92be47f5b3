"""Everything that touches bitsandbytes: quantization configs and the paged 8-bit optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig for 8bit or 4bit (NF4 + double quantization), or None."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def paged_adamw_8bit(params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float,
                     weight_decay: float, device: str) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (parameters, or groups of them); CUDA only."""
    if not device.startswith("cuda"):
        raise ValueError(f"optimizer 'paged-adamw-8bit' needs a CUDA device, but this client "
                         f"runs on {device!r}; use optimizer=adamw on the CPU")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
