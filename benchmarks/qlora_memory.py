"""QLoRA memory: peak memory of one client with a 4-bit base against 16-bit and fp32 bases.

Each variant runs in its own fresh Python process (this script re-invoked with --child), so
that no allocation, cache or allocator high-water mark of one variant pollutes another. The
child does what a fedlora client does in its first round: load the base and add the LoRA
adapter (fedlora.adapters.Workspace, which also runs PEFT's prepare_model_for_kbit_training
for a quantized base), then a few optimizer steps of fedlora.train.train_local on
fixed-length batches. It reports:

- peak RSS: VmHWM of /proc/self/status, the high-water mark of the whole process (Python,
  torch and libraries included, and file pages of the checkpoint while mapped);
- the same above the RSS measured right after the imports, i.e. what the model and training
  added;
- the model's own footprint (parameters + buffers, `get_memory_footprint()`);
- torch.cuda.max_memory_allocated() when the client ran on a GPU.

Variants: fp32 (quantization none, compute-dtype float32), bf16 (none, bfloat16: the base is
loaded in bf16), 4bit (NF4 + double quantization, compute-dtype bfloat16: QLoRA as usually
run) and 4bit-fp32 (NF4 with compute-dtype float32, what compute-dtype=auto gives on a CPU).

    python benchmarks/qlora_memory.py
    python benchmarks/qlora_memory.py --model tiny-llama --variants 4bit bf16
    python benchmarks/qlora_memory.py --variants 4bit bf16 --gradient-checkpointing
    python benchmarks/qlora_memory.py --shape llama-7b --variants 4bit 4bit bf16 \
        --batch-size 1 --steps 1

`--shape llama-7b` measures at the size users pay for: a model of Llama-2-7B's shape (hidden
4096, FFN 11008, 32 layers, 32 heads, untied head) with SmolLM2's tokenizer and 49,152-token
vocabulary, **random** bf16 weights (N(0, 0.02), norms 1), written tensor by tensor into a
temporary folder (about 14 GB of disk; no more than one tensor in memory). Memory depends on
the shapes, not on the weights' values; the losses on it mean nothing. The first 4-bit variant
quantizes it on load and writes fedlora's pre-quantized copy, which every later load of a node
reads; name `4bit` twice to measure that second load too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

VARIANTS = {  # name -> (quantization, compute-dtype)
    "fp32": ("none", "float32"),
    "bf16": ("none", "bfloat16"),
    "4bit": ("4bit", "bfloat16"),
    "4bit-fp32": ("4bit", "float32"),
}
HEADLINE = ("4bit", "bf16")
SHAPES = {  # name -> transformers LlamaConfig fields (the vocabulary is SmolLM2's tokenizer's)
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
                 "tie_word_embeddings": False},
}


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="bases to measure, each in its own process")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of train_local")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--max-length", type=int, default=256,
                   help="tokens per example (the default run's max-length; every example is "
                        "filled to it)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (all-linear targets)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="train with gradient checkpointing (recompute activations in backward)")
    p.add_argument("--shape", choices=list(SHAPES),
                   help="instead of --model: a model of this shape with random weights, "
                        "built in a temporary folder (see above)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal
    return p.parse_args()


# ---------------------------------------------------------------- child process


def child(args) -> None:
    """Measure one variant in this (fresh) process; print one JSON line on stdout."""
    common.quiet_libraries()
    import bitsandbytes  # noqa: F401  imported by every variant, so the baselines match
    import torch

    from fedlora.adapters import Workspace
    from fedlora.config import Settings
    from fedlora.train import RoundPlan, train_local

    quantization, dtype = VARIANTS[args.child]
    settings = Settings.from_config({
        "model": args.model, "quantization": quantization, "compute-dtype": dtype,
        "lora-rank": args.lora_rank, "local-steps": args.steps, "batch-size": args.batch_size,
        "max-length": args.max_length, "gradient-checkpointing": args.gradient_checkpointing})
    out = {"variant": args.child, "after_imports": common.rss_mib()}

    with common.stopwatch() as load:
        slot = Workspace().get(settings.model, settings.lora, settings.train)
    out.update(load_s=load["seconds"], load_peak=common.peak_rss_mib(),
               footprint=slot.model.get_memory_footprint())

    examples = common.packed_examples(slot.tokenizer, 4 * args.batch_size, args.max_length)
    result = train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                         settings.train, RoundPlan(), desc=args.child)
    out.update(train_s=result.seconds, loss=result.loss, peak=common.peak_rss_mib(),
               rss_end=common.rss_mib(), anon_end=common.rss_mib("RssAnon"),
               file_end=common.rss_mib("RssFile"))
    if torch.cuda.is_available():
        out["cuda_peak"] = torch.cuda.max_memory_allocated() / common.MIB
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent process


def loadable_folder(model: str, workdir: Path) -> str:
    """The model to pass to the children; works around a stale GGUF config if there is one.

    A folder converted from a GGUF file by fedlora (the built-in smollm2-135m) may still carry
    `quantization_config: {quant_method: gguf}` in its config.json; transformers then refuses
    a BitsAndBytesConfig ("The model is quantized with GgufConfig but you are passing a
    BitsAndBytesConfig"). In that case every variant loads a mirror of the folder (the same
    weight files, symlinked) whose config.json lacks that entry.
    """
    from fedlora.models import resolve_source

    source = Path(resolve_source(model).path)
    config = json.loads((source / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return model
    print(f"note: {source}/config.json carries a GGUF quantization_config, which makes "
          f"quantization=4bit fail to load; measuring all variants on a mirror without it",
          file=sys.stderr)
    mirror = workdir / "model"
    mirror.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (mirror / item.name).symlink_to(item)
    del config["quantization_config"]
    (mirror / "config.json").write_text(json.dumps(config, indent=2))
    return str(mirror)


def random_model(shape: str, workdir: Path) -> str:
    """A folder holding a model of `shape` with random bf16 weights and SmolLM2's tokenizer,
    written one tensor at a time (shards of about 2 GB and their index, as save_pretrained
    writes them)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaForCausalLM

    from fedlora.models import resolve_source

    smollm2 = Path(resolve_source("smollm2-135m").path)
    config = AutoConfig.from_pretrained(smollm2)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.torch_dtype = "bfloat16"
    if hasattr(config, "quantization_config"):  # a GGUF-converted folder's leftover
        del config.quantization_config
    out = workdir / shape
    out.mkdir()
    config.save_pretrained(out)
    for item in smollm2.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(item, out / item.name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, dims in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= 2 * 1024**3:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(f"{shape}: {sum(math.prod(d) for d in shapes.values()) / 1e9:.2f} B parameters of "
          f"random bf16 weights in {out}", flush=True)
    return str(out)


def run_child(variant: str, model: str, args, cache: Path | None = None) -> dict | None:
    """Run one variant in a fresh interpreter; its JSON line, or None if it failed. `cache`:
    the children's fedlora cache (their pre-quantized copies), instead of the user's."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model", model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lora-rank", str(args.lora_rank)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = {**os.environ, "FEDLORA_CACHE": str(cache)} if cache else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"variant {variant} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def report(args, results: dict[str, dict]) -> None:
    """Table of every variant and the 4bit/16-bit ratios."""
    cuda = any("cuda_peak" in r for r in results.values())
    headers = ["variant", "model footprint", "peak RSS (VmHWM)", "peak above imports",
               "peak after load", "RSS at end", "load s", "train s"]
    headers += ["CUDA max allocated"] if cuda else []
    rows = []
    for name, r in results.items():
        row = [name, common.fmt_bytes(r["footprint"]), f"{r['peak']:.0f} MiB",
               f"{r['peak'] - r['after_imports']:.0f} MiB", f"{r['load_peak']:.0f} MiB",
               f"{r['rss_end']:.0f} MiB", f"{r['load_s']:.1f}", f"{r['train_s']:.1f}"]
        rows.append(row + ([f"{r.get('cuda_peak', float('nan')):.0f} MiB"] if cuda else []))
    common.print_table(headers, rows, title=(
        f"One client: load + LoRA r={args.lora_rank} + {args.steps} steps of train_local, "
        f"batch {args.batch_size} x {args.max_length} tokens, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}"))

    low, high = (results.get(v) for v in HEADLINE)
    if low and high:
        print(f"peak RSS 4bit/bf16: {low['peak'] / high['peak']:.3f}   above imports: "
              f"{(low['peak'] - low['after_imports']) / (high['peak'] - high['after_imports']):.3f}"
              f"   model footprint: {low['footprint'] / high['footprint']:.3f}")
        if cuda:
            print(f"CUDA max allocated 4bit/bf16: {low['cuda_peak'] / high['cuda_peak']:.3f}")
    print(f"machine: {common.machine()}")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    common.quiet_libraries()
    workdir = Path(tempfile.mkdtemp(prefix="fedlora-bench-"))
    try:
        model = (random_model(args.shape, workdir) if args.shape
                 else loadable_folder(args.model, workdir))
        results = {}
        # a random model's pre-quantized copy goes with its folder, not into the user's cache
        cache = workdir / "cache" if args.shape else None
        for variant in args.variants:
            print(f"measuring {variant} in a fresh process ...", flush=True)
            if (r := run_child(variant, model, args, cache)) is not None:
                if variant in results:  # measured again: the later load is the headline
                    results[f"{variant} (first load)"] = results.pop(variant)
                results[variant] = r
        report(args, results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
