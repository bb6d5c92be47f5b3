"""`fedlora export`: fold a global adapter into its base model and save a plain HF model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora export`."""
    p.add_argument("--adapter", required=True,
                   help="a PEFT adapter folder written by fedlora (e.g. fedlora-output/final)")
    p.add_argument("--output-dir", "--merged", dest="output_dir", required=True,
                   help="where the merged model goes (loads with "
                        "AutoModelForCausalLM.from_pretrained)")
    p.add_argument("--model", help="base model (default: the one the run used, from the "
                   "adapter's fedlora.json, else its adapter_config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")


# PEFT types whose adapter cannot be folded into the base weights
VIRTUAL_TOKEN_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
# ... and the other PEFT types that cannot be folded, with the reason
UNMERGEABLE = {"LORA_MOE": "it routes each token to its own experts, which no single weight "
                           "matrix can express",
               "BOTTLENECK": "its adapters are nonlinear in each layer's output, which no "
                             "weight of the base model can express"}


def check_adapter(adapter: Path) -> None:
    """Raise FileNotFoundError unless `adapter` is a PEFT adapter folder."""
    from fedlora.adapters.lora import SAFETENSORS_NAME

    if not (adapter / SAFETENSORS_NAME).exists() or not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (expected "
                                f"adapter_config.json and {SAFETENSORS_NAME})")


def base_model_name(adapter: Path, override: str | None) -> str:
    """The base model to merge into: --model, the run's model, or PEFT's base id."""
    if override:
        return override
    info = adapter / "fedlora.json"
    if info.exists():
        return json.loads(info.read_text())["model"]
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def run(args: argparse.Namespace) -> int:
    """Load base + adapter on the CPU in float32, merge, save model and tokenizer."""
    adapter, out = Path(args.adapter), Path(args.output_dir)
    check_adapter(adapter)
    peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    reason = UNMERGEABLE.get(peft_type) or (
        "it adds virtual tokens (a soft prompt, or keys and values at every layer) that no "
        "weight of the base model can hold" if peft_type in VIRTUAL_TOKEN_TYPES else None)
    if reason:  # refused before the base model is loaded
        raise ValueError(f"{adapter} is a {peft_type} adapter: {reason}, so it cannot be "
                         f"merged; use it as an adapter (fedlora generate --adapter, "
                         f"PeftModel.from_pretrained)")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another "
                              f"--output-dir")
    from peft import PeftModel

    from fedlora.config import ModelSettings
    from fedlora.models import load_model

    name = base_model_name(adapter, args.model)
    print(f"fedlora: merging {adapter} into {name!r} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    base, tokenizer, _ = load_model(ModelSettings(name=name, device="cpu",
                                                  compute_dtype="float32"))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model: {out} in {time.perf_counter() - began:.1f} s  (load with "
          f"AutoModelForCausalLM.from_pretrained)")
    return 0
