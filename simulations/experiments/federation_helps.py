"""Does federation help? Local-only vs FedAvg vs a rank-heterogeneous strategy vs centralised.

    python -m simulations.experiments.federation_helps --output-dir results/federation-helps

K clients each hold one domain (by-field partition over the records' `task`: non-IID): a family
of the built-in task suite (`--split families`), or a real BIG-bench task (`--split bigbench`,
the tasks `--bigbench-tasks` from `--bigbench-dir`). Every
arm gets the same budget of local optimizer steps per client (R rounds x S steps):

- base:    the pretrained model, no adapter (what the model knows already);
- local:   each client trains alone for R x S steps on its own train split;
- fedavg:  `fedlora simulate --strategy fedavg`, R rounds of S steps;
- hetero:  `fedlora simulate --strategy flexlora` with client ranks cycling over --ranks;
- fedsa:   `fedlora simulate --strategy fedsa-lora` (A shared, each client's B private: the
           best strategy of benchmarks/strategy_comparison.py); no global model, so, as for
           local, each client's own model answers the whole union and the table shows the mean;
- moe-learned, moe-cluster, moe-client: `fedlora simulate --peft lora-moe --strategy lora-moe`
           with `moe-assign` learned (every client trains every expert, the router decides),
           cluster (clients clustered by their round-1 updates, one expert per cluster) or
           client (client p owns expert p mod --moe-experts);
- moe-routed: moe-client with the routing loss (`moe-route=1`) and the routers at 20x the
           learning rate (`moe-router-lr=20`): the router also learns, from each client's
           own expert, where a client's kind of data belongs;
- moe-routed-top1: moe-routed with one expert per token (`moe-top-k=1`): the own expert at
           full weight in training, the router's one choice at inference;
- moe-shared, moe-shared-top1: moe-routed (top 2, top 1) plus a shared expert (`moe-shared=1`)
           that every token uses and every client trains, averaged over all clients;
- central: one adapter on the pooled train splits of all clients for K x R x S steps (the same
           total number of steps as the K clients together).

Every adapter is scored the same way: greedy answers on the union of the clients' held-out
splits (no question of it is trained on), exact match per family. Results go to
<output-dir>/results.json (per arm and seed: the metrics, the adapter's folder, which is kept
under <output-dir>/seed-<n>/, and every scored answer: question, expected, answer, correct)
and a Markdown table <output-dir>/results.md. The flags, the arms and what this shares with
moe_routing.py and benchmarks/strategy_comparison.py are in simulations/experiments/harness.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from simulations.experiments.harness import (
    MOE_ARMS,
    SIMULATE,
    client_splits,
    domains,
    exact_answers,
    load_scored,
    parse_args,
    run_config_text,
    settings_for,
    write_results,
)

MODEL_KEYS = ("lr", "batch-size", "max-length", "max-new-tokens", "lora-rank", "dataset",
              "dataset-size", "partitioner", "partition-field", "eval-fraction")


def train_alone(settings, records: list[dict], steps: int, seed: int, out: Path) -> Path:
    """One adapter trained on `records` for `steps` steps, written as a PEFT adapter."""
    from fedlora.adapters import (
        Workspace,
        flatten,
        get_lora_state,
        lora_config,
        module_shapes,
        set_lora_state,
        shared_init,
    )
    from fedlora.data import tokenize_records
    from fedlora.outputs import RunWriter
    from fedlora.train import RoundPlan, train_local

    slot = Workspace().get(settings.model, settings.lora, settings.train)
    shapes = module_shapes(get_lora_state(slot.model, slot.adapter))
    set_lora_state(slot.model, flatten(shared_init(shapes, settings.lora.rank, seed)),
                   slot.adapter)
    examples = tokenize_records(records, slot.tokenizer, settings.train.max_length)
    train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                replace(settings.train, local_steps=steps), RoundPlan(seed=seed), desc=out.name)
    writer = RunWriter(out, lora_config(settings.lora, slot.source.base_id),
                       {"model": settings.model.name, "steps": steps})
    return writer.write_final(get_lora_state(slot.model, slot.adapter), settings.lora.rank)


def simulate(args: argparse.Namespace, config: dict, out: Path, extra: list[str],
             arm_config: str = "") -> Path:
    """A `fedlora simulate` run of the federated arm (`arm_config`: its own run-config
    settings on top of the shared ones); its final adapter."""
    shared = run_config_text(config, MODEL_KEYS)
    command = [*SIMULATE, "--model", args.model,
               "--num-clients", str(args.clients), "--rounds", str(args.rounds),
               "--local-steps", str(args.local_steps), "--output-dir", str(out), "--overwrite",
               "--run-config", f"{shared} seed={config['seed']} fraction-evaluate=0.0 "
               f"eval-accuracy=0 {arm_config}", *extra]
    subprocess.run(command, check=True)
    return out / "final"


def score(settings, adapter: Path | None, test: list[dict]) -> dict:
    """Exact-match accuracy (overall and per family) of base + adapter on `test`, with the
    adapter's folder (its run) and every scored answer, so that a number can be checked."""
    model, tokenizer = load_scored(settings, adapter)
    accuracy, answers = exact_answers(settings, model, tokenizer, test)
    return {**accuracy.metrics(), "adapter": str(adapter) if adapter else None,
            "answers": answers}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, list[dict]]:
    """{arm: [scores of each adapter of that arm]} for one seed."""
    settings, config = settings_for(args, seed)
    splits = client_splits(settings, args.clients, seed)
    test = [r for _, held_out in splits for r in held_out[: args.test_per_client]]
    folder = args.output_dir / f"seed-{seed}"
    arms, budget = args.arms.split(","), args.rounds * args.local_steps
    results: dict[str, list[dict]] = {}
    log = lambda msg: print(f"[seed {seed}] {msg}", file=sys.stderr, flush=True)
    for arm in arms:
        started = time.perf_counter()
        if arm == "base":
            results[arm] = [score(settings, None, test)]
        elif arm == "local":
            results[arm] = [score(settings, train_alone(settings, train, budget, seed + pid,
                                                        folder / f"local-{pid}"), test)
                            for pid, (train, _) in enumerate(splits)]
        elif arm == "central":
            pooled = [r for train, _ in splits for r in train]
            results[arm] = [score(settings, train_alone(settings, pooled, budget * args.clients,
                                                        seed, folder / "central"), test)]
        elif arm == "fedavg":
            results[arm] = [score(settings, simulate(args, config, folder / "fedavg",
                                                     ["--strategy", "fedavg"]), test)]
        elif arm == "hetero":
            results[arm] = [score(settings, simulate(
                args, config, folder / "hetero",
                ["--strategy", "flexlora", "--client-ranks", args.ranks]), test)]
        elif arm == "fedsa":
            from fedlora.mixing import personal_adapter

            final = simulate(args, config, folder / "fedsa", ["--strategy", "fedsa-lora"])
            results[arm] = [score(settings, personal_adapter(final.parent, pid), test)
                            for pid in range(args.clients)]
        else:  # a moe arm
            results[arm] = [score(settings, simulate(
                args, config, folder / arm,
                ["--peft", "lora-moe", "--strategy", "lora-moe"],
                f'moe-assign="{MOE_ARMS[arm][0]}" {MOE_ARMS[arm][1]} '
                f"moe-experts={args.moe_experts}"), test)]
        log(f"{arm}: accuracy {statistics.mean(r['accuracy'] for r in results[arm]):.3f} "
            f"({time.perf_counter() - started:.0f} s)")
    return results


def table(all_results: dict[int, dict[str, list[dict]]]) -> str:
    """Markdown: one row per arm, mean ± spread over seeds (local: mean over its clients);
    a column per family or task of the test set."""
    arms = list(next(iter(all_results.values())))
    scores = [r for res in all_results.values() for rows in res.values() for r in rows]
    families = sorted({k.split("/", 1)[1] for r in scores for k in r if k.startswith("accuracy/")})
    keys = ["accuracy"] + [f"accuracy/{f}" for f in families]
    lines = ["| arm | " + " | ".join(["all"] + families) + " |",
             "|---|" + "---:|" * len(keys)]
    for arm in arms:
        cells = []
        for key in keys:
            per_seed = [statistics.mean(r.get(key, 0.0) for r in res[arm])
                        for res in all_results.values()]
            mean = statistics.mean(per_seed)
            spread = (max(per_seed) - min(per_seed)) / 2 if len(per_seed) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {spread:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedlora.runtime.quiet import quiet

    args = parse_args(argv)
    quiet()  # fedlora's own output, not the dependencies' warnings (runs inherit it)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    all_results = {}
    for seed in seeds:
        all_results[seed] = run_seed(args, seed)
        write_results(args, all_results)
    text = (f"{args.clients} clients, one domain each ({','.join(domains(args))}), "
            f"{args.rounds} rounds x "
            f"{args.local_steps} local steps, seeds {args.seeds}, model {args.model}; "
            f"accuracy = exact match on the union of the clients' held-out splits "
            f"(mean ± half-range over seeds; local = mean over the clients' own adapters)\n\n"
            + table(all_results) + "\n")
    (args.output_dir / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
