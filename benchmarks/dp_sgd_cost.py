"""The cost of record-level DP (dp-sgd): `train_local` with and without it, same model.

One model with one adapter trains on the same fixed-length examples with dp-sgd off (plain
steps of batch-size examples) and on (Poisson-sampled steps of batch-size examples expected,
per-example gradients, clipping, noise; the noise multiplier derived for epsilon 8 over the
timed steps). After one warm-up call of each, the two alternate over several repeats (who goes
first swaps every repeat) and the median steps/s and examples/s of each are compared. A
dp-sgd step trains on a random number of examples (batch-size on average), so examples/s is
the fairer figure.

    python benchmarks/dp_sgd_cost.py --model tiny-llama    # seconds
    python benchmarks/dp_sgd_cost.py                       # SmolLM2-135M, a few minutes on CPU
    python benchmarks/dp_sgd_cost.py --peft prompt-tuning  # a method trained one by one
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--peft", default="lora", help="PEFT method (one dp-sgd covers)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed call")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of each, alternating (median is reported)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (expected)")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example; every example has exactly this length")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    return p.parse_args()


def run(args) -> None:
    from dataclasses import replace

    import torch

    from fedlora.adapters import Workspace
    from fedlora.adapters import option_keys as peft_option_keys
    from fedlora.config import Settings
    from fedlora.train import RoundPlan, train_local

    common.quiet_libraries()
    settings = Settings.from_config(
        {"model": args.model, "peft": args.peft, "batch-size": args.batch_size,
         "max-length": args.max_length, "device": args.device,
         "quantization": args.quantization, "bf16": args.bf16, "dp-sgd-epsilon": 8.0},
        peft_options=peft_option_keys())
    torch.manual_seed(0)
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    pad_id = slot.tokenizer.pad_token_id
    examples = common.packed_examples(slot.tokenizer, 16 * args.batch_size, args.max_length)
    cuda = str(next(slot.model.parameters()).device).startswith("cuda")

    def trainer(dp_sgd: bool):
        train = replace(settings.train, dp_sgd=dp_sgd)

        def call(steps: int, seed: int) -> tuple[int, float]:
            with common.stopwatch() as t:
                result = train_local(slot.model, slot.adapter, examples, pad_id,
                                     replace(train, local_steps=steps), RoundPlan(seed=seed),
                                     desc="dp-sgd" if dp_sgd else "plain")
                if cuda:
                    torch.cuda.synchronize()
            # tokens / length = examples trained on (every example has the same length)
            return result.tokens // args.max_length, t["seconds"]

        return call

    trainers = {"plain": trainer(False), "dp-sgd": trainer(True)}
    print(f"model {args.model}, peft {args.peft} ({args.quantization} base, "
          f"{settings.model.device}), batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.steps} steps per call, {args.repeats} alternating repeats", flush=True)
    for call in trainers.values():
        call(1, 0)
    steps_s: dict[str, list[float]] = {name: [] for name in trainers}
    examples_s: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(args.repeats):
        for name in (list(trainers) if i % 2 == 0 else list(reversed(trainers))):
            count, seconds = trainers[name](args.steps, i + 1)
            steps_s[name].append(args.steps / seconds)
            examples_s[name].append(count / seconds)
    common.print_table(
        ["training", "median steps/s", "median examples/s"],
        [[name, f"{common.median(steps_s[name]):.3f}", f"{common.median(examples_s[name]):.2f}"]
         for name in trainers], title="dp-sgd against plain training")
    ratio = common.median(examples_s["dp-sgd"]) / common.median(examples_s["plain"])
    print(f"dp-sgd / plain examples/s: {ratio:.3f}")
    print(f"machine: {common.machine()}")


if __name__ == "__main__":
    run(parse_args())
