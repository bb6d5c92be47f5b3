"""Resolve what the user typed as `--model` into something `from_pretrained` can load."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from fedlora.models.builtin import BUILTINS, cache_root, convert_gguf, materialise


class ModelLoadError(RuntimeError):
    """The model could not be found or fetched; the message says what to pass instead."""


WHAT_TO_PASS = ("pass a built-in name (" + ", ".join(BUILTINS) + "), a local model folder "
                "(with config.json), a .gguf file, or a Hugging Face hub id such as "
                "HuggingFaceTB/SmolLM2-135M-Instruct when online")


@dataclass(frozen=True)
class ModelSource:
    """A loadable model: a local folder, or a hub id; plus the id adapters record as base."""

    name: str
    path: str  # local folder, or hub id when `hub` is true
    base_id: str  # written as base_model_name_or_path in adapter_config.json
    hub: bool = False


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect (fails fast when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(hub_id: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def resolve_source(name: str) -> ModelSource:
    """Turn a built-in name, folder, .gguf file or hub id into a ModelSource, or raise."""
    if name in BUILTINS:
        folder_fn, base_id = BUILTINS[name]
        return ModelSource(name, str(folder_fn()), base_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json; {WHAT_TO_PASS}")
        return ModelSource(name, str(path.resolve()), str(path.resolve()))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; {WHAT_TO_PASS}")
        stat = path.resolve().stat()
        key = f"gguf2-{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        folder = materialise(key, lambda out: convert_gguf(path.resolve(), out))
        return ModelSource(name, str(folder), str(path.resolve()))
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"unknown model {name!r}: not a built-in, not an existing folder "
                             f"or .gguf file, and not a hub id of the form owner/name; "
                             f"{WHAT_TO_PASS}")
    if not hub_cached(name) and not hub_reachable():
        raise ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached (offline or HF_HUB_OFFLINE=1); download it on a connected machine "
            f"(huggingface-cli download {name}) and copy the folder here, or {WHAT_TO_PASS}")
    return ModelSource(name, name, name, hub=True)


__all__ = ["ModelLoadError", "ModelSource", "resolve_source", "cache_root"]
