"""Training throughput: fedlora's `train_local` against a plain PEFT loop, same work.

Both trainers get the same base weights, the same LoRA configuration and the very same
batches (fixed-length, unpadded examples drawn in the same seeded order), run the same number
of optimizer steps, and count tokens the same way (the sum of the attention mask, which with
unpadded examples is batch size x sequence length). After one warm-up call of each, the two
alternate over several repeats (who goes first swaps every repeat) and the median tokens/s
of each is compared. Each timed call includes its own optimizer construction.

The plain loop is the textbook one: get_peft_model, torch.optim.AdamW,
forward / backward / step / zero_grad. fedlora's loop adds, per step, a learning-rate
schedule update, gradient clipping (max-grad-norm=1.0, its default), a `loss.item()`,
a tqdm bar and a (disabled on CPU) autocast context.

    python benchmarks/trainer_throughput.py                       # SmolLM2-135M, a few minutes
    python benchmarks/trainer_throughput.py --model tiny-llama    # seconds
    python benchmarks/trainer_throughput.py --device cuda --quantization 4bit --bf16   # QLoRA

With `--quantization 4bit|8bit` both trainers load the base through bitsandbytes (the plain
loop with the same BitsAndBytesConfig and PEFT's prepare_model_for_kbit_training); with
`--bf16` both run the forward pass under bf16 autocast. On CUDA the table adds each trainer's
peak GPU memory above what was allocated before its call (activations, gradients, optimizer
state; both models stay resident, so their weights are not counted).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed call")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls of each trainer, alternating (median is reported)")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="optimizer steps of one untimed warm-up call of each trainer")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example; every example has exactly this length")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--target-modules", default="all-linear", help="LoRA target modules")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and batch order")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"),
                   help="base weights of both trainers (bitsandbytes)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers")
    return p.parse_args()


def fedlora_trainer(settings):
    """Load the model the way a fedlora client does; return (train(examples, steps, seed), tok)."""
    from dataclasses import replace

    from fedlora.adapters import Workspace
    from fedlora.train import RoundPlan, train_local

    slot = Workspace().get(settings.model, settings.lora, settings.train)
    pad_id = slot.tokenizer.pad_token_id

    def train(examples, steps, seed):
        result = train_local(slot.model, slot.adapter, examples, pad_id,
                             replace(settings.train, local_steps=steps),
                             RoundPlan(seed=seed), desc="fedlora")
        return result.tokens

    return train, slot.tokenizer


def plain_trainer(settings, pad_id: int):
    """The same base model wrapped with plain PEFT; return train(examples, steps, seed)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from fedlora.data import collate
    from fedlora.models import resolve_device, resolve_dtype, resolve_source
    from fedlora.models.quantization import bnb_config
    from fedlora.train.loop import batches  # the same seeded batch order as train_local

    source = resolve_source(settings.model.name)
    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.compute_dtype, device)
    quant = bnb_config(settings.model.quantization, dtype)
    base = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=dtype, device_map={"": device},
        **({"quantization_config": quant} if quant is not None else {}))
    if quant is not None:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora = settings.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules="all-linear" if lora.all_linear else lora.modules(),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)

    def train(examples, steps, seed):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.train.lr,
                                      weight_decay=settings.train.weight_decay)
        stream = batches(examples, settings.train.batch_size, seed)
        model.train()
        tokens = 0
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in collate(next(stream), pad_id).items()}
            tokens += int(batch["attention_mask"].sum())
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                                enabled=settings.train.bf16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        return tokens

    return train


def timed(train, examples, steps, seed, cuda: bool) -> tuple[int, float, float]:
    """(tokens, seconds, peak CUDA MiB above the start; 0 off CUDA) of one call of a trainer."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with common.stopwatch() as t:
        tokens = train(examples, steps, seed)
        if cuda:
            torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - start) / 2**20 if cuda else 0.0
    return tokens, t["seconds"], peak


def run(args) -> None:
    import torch

    from fedlora.config import Settings
    from fedlora.models import resolve_device

    common.quiet_libraries()
    settings = Settings.from_config({
        "model": args.model, "lora-rank": args.lora_rank, "target-modules": args.target_modules,
        "batch-size": args.batch_size, "max-length": args.max_length, "seed": args.seed,
        "device": args.device, "quantization": args.quantization, "bf16": args.bf16})
    torch.manual_seed(args.seed)
    ours, tokenizer = fedlora_trainer(settings)
    torch.manual_seed(args.seed)
    plain = plain_trainer(settings, tokenizer.pad_token_id)
    examples = common.packed_examples(tokenizer, 8 * args.batch_size, args.max_length, args.seed)
    trainers = {"fedlora train_local": ours, "plain PEFT loop": plain}
    cuda = resolve_device(settings.model.device).startswith("cuda")

    print(f"model {args.model} ({args.quantization} base, bf16 autocast "
          f"{'on' if args.bf16 else 'off'}, {settings.model.device}), "
          f"LoRA r={args.lora_rank} on {args.target_modules}, "
          f"batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps per call, "
          f"{args.repeats} alternating repeats after a {args.warmup_steps}-step warm-up",
          flush=True)
    for train in trainers.values():
        train(examples, args.warmup_steps, args.seed)

    rates: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, list[float]] = {name: [] for name in trainers}
    rows = []
    for i in range(args.repeats):
        order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
        result = {}
        for name in order:
            tokens, seconds, peak = timed(trainers[name], examples, args.steps, args.seed + i,
                                          cuda)
            result[name] = (tokens, seconds)
            rates[name].append(tokens / seconds)
            peaks[name].append(peak)
        (t_ours, s_ours), (t_plain, s_plain) = result["fedlora train_local"], \
            result["plain PEFT loop"]
        if t_ours != t_plain:
            print(f"warning: token counts differ ({t_ours} vs {t_plain})", file=sys.stderr)
        rows.append([i + 1, t_ours, f"{s_ours:.2f}", f"{t_ours / s_ours:.1f}",
                     f"{s_plain:.2f}", f"{t_plain / s_plain:.1f}",
                     f"{(t_ours / s_ours) / (t_plain / s_plain):.3f}"])
        print(f"repeat {i + 1}/{args.repeats}: ours {t_ours / s_ours:.1f} tok/s, "
              f"plain {t_plain / s_plain:.1f} tok/s", flush=True)

    common.print_table(["repeat", "tokens", "ours s", "ours tok/s", "plain s", "plain tok/s",
                        "ours/plain"], rows, title="Per repeat")
    med_ours, med_plain = common.median(rates["fedlora train_local"]), \
        common.median(rates["plain PEFT loop"])
    common.print_table(
        ["trainer", "median tokens/s", "min", "max", "peak CUDA MiB above start"],
        [[name, f"{common.median(r):.1f}", f"{min(r):.1f}", f"{max(r):.1f}",
          f"{max(peaks[name]):.0f}" if cuda else "-"]
         for name, r in rates.items()], title="Summary")
    print(f"throughput ratio ours/plain (median tok/s): {med_ours / med_plain:.3f}  "
          f"(target >= 1.0)")
    print(f"machine: {common.machine()}")


if __name__ == "__main__":
    run(parse_args())
