"""Tokens/s of one node's local training on one device against all of them (data parallel).

The same examples and settings train with `devices` = the first of `--devices` alone (one
process, `train_local`) and with all of them (`fedlora.train.distributed`: one process per
device, each on its slice of every micro-batch, gradients summed). After one warm-up call of
each (the replicas load their base then), the two alternate over several repeats and the
median tokens/s of each is printed side by side. On the CPU (`--devices cpu:2`) the processes
share the machine's cores, so the figure says what the data-parallel overhead costs there,
not what GPUs gain.

    python benchmarks/multi_device.py --model tiny-llama --devices cpu:2   # seconds, CPU
    python benchmarks/multi_device.py --devices auto                       # every GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--devices", default="auto",
                   help="the devices to compare with one: auto (every GPU), 0,1, cpu:N")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed call")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of each, alternating (median is reported)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example; every example has exactly this length")
    p.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    return p.parse_args()


def run(args) -> None:
    from dataclasses import replace

    import torch

    from fedlora.adapters import Workspace
    from fedlora.config import Settings
    from fedlora.devices import resolve
    from fedlora.train import RoundPlan, train_local
    from fedlora.train.distributed import adapter_parameters, close_pool, train_parallel
    from fedlora.train.hooks import LocalTraining

    common.quiet_libraries()
    settings = Settings.from_config(
        {"model": args.model, "batch-size": args.batch_size, "max-length": args.max_length,
         "quantization": args.quantization, "lora-dropout": 0.0, "devices": args.devices})
    devices = resolve(args.devices, "auto", torch.cuda.device_count())
    if len(devices) < 2:
        raise SystemExit(f"--devices {args.devices} gives {devices}: nothing to compare with "
                         f"one device (pass cpu:2 on a machine without GPUs)")
    settings = replace(settings, model=replace(settings.model, device=devices[0]))
    torch.manual_seed(0)
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    start = adapter_parameters(slot.model, slot.adapter)
    examples = common.packed_examples(slot.tokenizer, 16 * args.batch_size, args.max_length)
    hooks = slot.peft.training_hooks(slot.model, slot.adapter, settings.lora, LocalTraining())
    cuda = devices[0].startswith("cuda")

    def reset() -> None:
        named = dict(slot.model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                named[name].copy_(value)

    def call(parallel: bool, steps: int, seed: int) -> tuple[int, float]:
        reset()
        train = replace(settings.train, local_steps=steps)
        run_settings = replace(settings, train=train)
        with common.stopwatch() as t:
            if parallel:
                result = train_parallel(devices, slot, run_settings, examples,
                                        RoundPlan(seed=seed), hooks, None, "all")
            else:
                result = train_local(slot.model, slot.adapter, examples,
                                     slot.tokenizer.pad_token_id, train, RoundPlan(seed=seed),
                                     hooks, desc="one")
            if cuda:
                torch.cuda.synchronize()
        return result.tokens, t["seconds"]

    names = {f"1 process ({devices[0]})": False,
             f"{len(devices)} processes ({', '.join(devices)})": True}
    print(f"model {args.model} ({args.quantization} base), micro-batch {args.batch_size} x "
          f"{args.max_length} tokens, {args.steps} steps per call, {args.repeats} alternating "
          f"repeats", flush=True)
    try:
        for parallel in names.values():
            call(parallel, 1, 0)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.repeats):
            for name in (list(names) if i % 2 == 0 else list(reversed(names))):
                tokens, seconds = call(names[name], args.steps, i + 1)
                rates[name].append(tokens / seconds)
    finally:
        close_pool()
    common.print_table(["training", "median tokens/s"],
                       [[name, f"{common.median(rates[name]):.0f}"] for name in names],
                       title="one device against all")
    one, every = (common.median(rates[name]) for name in names)
    print(f"speed-up with {len(devices)} processes: {every / one:.2f}x")
    print(f"machine: {common.machine()}")


if __name__ == "__main__":
    run(parse_args())
