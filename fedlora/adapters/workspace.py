"""One base model per process, many adapters: what a long-lived ClientApp process keeps.

A Ray actor in simulation serves many virtual clients over many rounds, and a deployment
node's resident worker (`clients.worker`) serves every message of every run. Loading the base
model for each would dominate run time and grow memory with the number of clients, so the
workspace caches the frozen base once per model setting and PEFT method family (PEFT does not
combine LoRA and, say, IA3 layers on one base) and gives each distinct adapter setting its own
named adapter on it; clients then only swap adapter weights. Each load is
logged ("base model ... loaded: load N in process P"), so a node's log counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from peft import PeftModel
from peft.utils import prepare_model_for_kbit_training

from fedlora.adapters.base import PeftMethod, peft_method
from fedlora.adapters.lora import add_lora, set_lora_state
from fedlora.aggregation import Factors
from fedlora.config import LoraSettings, ModelSettings, TrainSettings
from fedlora.factors import flatten
from fedlora.models import ModelSource, load_model, resolve_device, resolve_dtype

log = logging.getLogger("fedlora.workspace")


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Slot:
    """A loaded model with the adapter a client should use."""

    model: PeftModel
    tokenizer: Any  # a Hugging Face tokenizer
    source: ModelSource
    adapter: str
    peft: PeftMethod  # reads and writes what the adapter federates (`get_state`, `set_state`)


class Workspace:
    """Caches base models and adapters for the lifetime of the process."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[PeftModel | None, Any, ModelSource, Any]] = {}
        self.loads = 0  # how many base models were loaded (tests check it stays at 1)

    def get(self, model: ModelSettings, lora: LoraSettings, train: TrainSettings) -> Slot:
        """Return the cached model with an adapter for `lora`, loading on first use only."""
        key = _digest([asdict(model), train.gradient_checkpointing, lora.peft])
        if key not in self._models:
            started = time.perf_counter()
            base, tokenizer, source = load_model(model)
            self.loads += 1
            log.info("base model %s loaded in %.1f s: load %d in process %d", source.name,
                     time.perf_counter() - started, self.loads, os.getpid())
            if model.quantization != "none" and upcasts_norms(model):
                # Casts norms to fp32 and readies the quantized base for adapter training.
                base = prepare_model_for_kbit_training(
                    base, use_gradient_checkpointing=train.gradient_checkpointing)
            elif train.gradient_checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                base.enable_input_require_grads()
            self._models[key] = (None, tokenizer, source, base)
        peft_model, tokenizer, source, base = self._models[key]
        adapter = "a" + _digest(asdict(lora))
        if peft_model is None or adapter not in peft_model.peft_config:
            peft_model = peft_method(lora.peft).add(peft_model or base, lora, adapter)
            self._models[key] = (peft_model, tokenizer, source, base)
        peft_model.set_adapter(adapter)
        return Slot(peft_model, tokenizer, source, adapter, peft_method(lora.peft))


def upcasts_norms(model: ModelSettings) -> bool:
    """Whether a quantized base gets PEFT's fp32 upcast of its other weights (norms,
    embeddings, LM head): not in bf16, on any device. bf16 has fp32's range, so the upcast
    (made against fp16 overflow) only turns every activation fp32. Measured without it
    (docs/benchmarks.md): on an H200 with a 1.1B-shaped model, batch 8 x 256, the 4-bit
    client's peak went from 1.29x a bf16 base's to 0.85x at the same loss; on the CPU, from
    13.6 to 9.1 GB with a 7B-shaped model (batch 1 x 256) and from 5.1 to 3.6 GB with
    SmolLM2-135M (batch 4 x 256)."""
    device = resolve_device(model.device)
    return resolve_dtype(model.compute_dtype, device) != torch.bfloat16


RESIDUAL = "residual"


def set_residual(slot: Slot, lora: LoraSettings, residual: Factors | None) -> None:
    """Put a frozen low-rank residual (delta W = B @ A) next to the base, or remove it.

    flora and fedex-lora fold merged updates into the frozen weights. Keeping them as a second,
    never-trained LoRA adapter with scale 1 is exact, keeps a 4-bit base un-requantized, and lets
    one cached base serve every client (the residual is replaced on each message).
    """
    model = slot.model
    model.set_adapter(slot.adapter)
    if RESIDUAL in model.peft_config:
        model.delete_adapter(RESIDUAL)
    if not residual:
        return
    rank = next(iter(residual.values()))[0].shape[1]
    settings = replace(lora, rank=rank, alpha=float(rank), dropout=0.0, use_rslora=False,
                       client_ranks="")  # alpha / r = 1: the adapter adds exactly B @ A
    add_lora(model, settings, RESIDUAL)
    set_lora_state(model, flatten(residual), RESIDUAL)
    # both active; only the slot's adapter trains
    model.base_model.set_adapter([slot.adapter, RESIDUAL])  # type: ignore[operator]
