"""Where do a trained mixture's routers send each family's tokens? (the moe arms of
federation_helps)

    python -m simulations.experiments.moe_routing --output-dir results/federation-helps \\
        --seeds 0,1 --test-per-client 10 --dataset-size 400

Takes the same data flags as `federation_helps` (simulations/experiments/harness.py) and
reads each moe arm's final adapter from <output-dir>/seed-<n>/<arm>/final. For every test
question (the same union of the clients' held-out splits), the prompt and answer tokens go
through the model once; at every adapted layer the router's top-k gates (what the forward
pass uses) are recorded. Printed per arm, seed and family: the mean gate of each expert over
the family's tokens and all layers (each row sums to 1), and `own`, the mean gate on the
expert the family's client owned (client and routed: expert p mod E for client p; cluster: its
cluster's expert, from metrics.jsonl; learned: none).
A router that had learned to tell the families apart gives `own` near 1; uniform top-k
routing over E experts gives 1/E. Results also go to <output-dir>/routing.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from simulations.experiments.harness import (
    MOE_ARMS,
    client_splits,
    parse_args,
    settings_for,
)


def owners(run: Path, assign: str, clients: int, experts: int) -> dict[int, int | None]:
    """{client: the expert it owned} for the assignment of a finished run."""
    if assign == "client":
        return {p: p % experts for p in range(clients)}
    if assign == "cluster":
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "moe-clusters" in row:
                return {int(p): int(e) for p, e in row["moe-clusters"].items()}
    return dict.fromkeys(range(clients))


def gates_by_record(model, tokenizer, records: list[dict], max_length: int) -> list[torch.Tensor]:
    """Per record, the mean over its tokens and the adapted layers of the router's gates (E,)."""
    from fedlora.adapters.lora_moe import LoraMoeLinear, route
    from fedlora.data import tokenize

    captured: list[torch.Tensor] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, LoraMoeLinear):
            for name, router in module.moe_router.items():
                top_k = module.moe_top_k[name]
                hooks.append(router.register_forward_hook(
                    lambda _m, _i, out, k=top_k: captured.append(
                        route(out, k)[0].reshape(-1, out.shape[-1]).mean(0))))
    out = []
    try:
        with torch.no_grad():
            for record in records:
                captured.clear()
                ids = tokenize(record, tokenizer, max_length)["input_ids"]
                model(input_ids=torch.tensor([ids]))
                out.append(torch.stack(captured).mean(0))
    finally:
        for hook in hooks:
            hook.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    from fedlora.runtime.quiet import quiet  # first: importing fedlora readies the environment

    args = parse_args(argv)
    quiet()
    from peft import PeftModel  # after fedlora (USE_HUB_KERNELS=0 before bitsandbytes loads)

    from fedlora.models import load_model

    arms = [a for a in args.arms.split(",") if a in MOE_ARMS]
    report: dict = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        settings, _ = settings_for(args, seed)
        splits = client_splits(settings, args.clients, seed)
        test = [(pid, r) for pid, (_, held_out) in enumerate(splits)
                for r in held_out[: args.test_per_client]]
        for arm in arms:
            run = args.output_dir / f"seed-{seed}" / arm
            if not (run / "final").is_dir():
                print(f"{arm} seed {seed}: no {run / 'final'}, skipped", file=sys.stderr)
                continue
            model, tokenizer, _ = load_model(settings.model)
            model = PeftModel.from_pretrained(model, str(run / "final")).eval()
            gates = gates_by_record(model, tokenizer, [r for _, r in test],
                                    settings.train.max_length)
            owner = owners(run, MOE_ARMS[arm][0], args.clients, args.moe_experts)
            by_family: dict[str, list[torch.Tensor]] = defaultdict(list)
            own: dict[str, list[float]] = defaultdict(list)
            for (pid, record), g in zip(test, gates, strict=True):
                by_family[record["task"]].append(g)
                if owner.get(pid) is not None:
                    own[record["task"]].append(float(g[owner[pid]]))
            rows = {}
            for family, per_record in sorted(by_family.items()):
                mean = [round(float(x), 4) for x in torch.stack(per_record).mean(0)]
                mine = round(statistics.mean(own[family]), 4) if own[family] else None
                rows[family] = {"gates": mean, "own": mine}
                print(f"{arm:12s} seed {seed} {family:50s} gates "
                      + " ".join(f"{x:.3f}" for x in mean)
                      + (f"  own {mine:.3f}" if mine is not None else ""))
            report[f"{arm}/seed-{seed}"] = rows
    (args.output_dir / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
