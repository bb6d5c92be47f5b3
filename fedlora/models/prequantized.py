"""A pre-quantized 4-bit copy of a base model, written once per machine, read by later loads.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` quantizes
every weight to NF4 on each load. In deployment every message starts a fresh ClientApp process,
so a 4-bit node pays that on every train and evaluate message (smollm2-135m on one CPU core:
3.7 s of quantizing against 0.6 s to read a saved 4-bit copy). The first 4-bit load on a
machine therefore saves the freshly quantized model (bitsandbytes' own serialisation through
`save_pretrained`: packed NF4 weights, absmax and quant state in safetensors) into the fedlora
cache; later loads read it and skip quantization. The weights are bitwise those a fresh
quantization gives (tests/test_model_cache.py).

The copy is keyed by everything that changes its bytes: the source's files (path, size, mtime;
for a hub id, the cached snapshot), the quantization config, the dtype, the device type, and
the transformers / bitsandbytes versions. `FEDLORA_PREQUANTIZED=0` turns it off (no reads, no
writes). 8-bit quantization is cheap to redo (0.3 s for smollm2-135m) and is not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from fedlora.models.builtin import cache_root, materialise
from fedlora.models.source import ModelSource

ENV = "FEDLORA_PREQUANTIZED"
CACHED = ("4bit",)
RECIPE = "prequantized-v1"  # bump when what is saved changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
log = logging.getLogger("fedlora.models")


def enabled() -> bool:
    """Whether pre-quantized copies are read and written (FEDLORA_PREQUANTIZED, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def source_folder(source: ModelSource) -> Path | None:
    """The local folder the source loads from (a hub id's cached snapshot), or None."""
    if not source.hub:
        return Path(source.path)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(source.path, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def cache_name(source: ModelSource, quantization: str, quant_config, dtype, device: str
               ) -> str | None:
    """The cache folder name of this source's pre-quantized copy; None when not cached."""
    folder = source_folder(source) if quantization in CACHED and enabled() else None
    if folder is None:
        return None
    import bitsandbytes
    import transformers

    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.resolve().iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    key = json.dumps([RECIPE, str(folder.resolve()), files, quantization,
                      quant_config.to_dict(), str(dtype), device.split(":")[0],
                      transformers.__version__, bitsandbytes.__version__],
                     sort_keys=True, default=str)
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(source.name).name)
    return f"{quantization}-{label[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_copy(name: str | None) -> Path | None:
    """The complete pre-quantized folder for `name`, if it was written before."""
    if name is None:
        return None
    folder = cache_root() / "models" / name
    return folder if (folder / "config.json").exists() else None


def save_copy(model, name: str) -> None:
    """Write the just-quantized model once (atomically, under a lock); a failure only warns."""
    try:
        materialise(name, model.save_pretrained)
    except (OSError, RuntimeError, ValueError) as err:
        log.warning("could not save a pre-quantized copy of the base model to %s (%s); "
                    "later loads quantize again", cache_root() / "models" / name, err)
