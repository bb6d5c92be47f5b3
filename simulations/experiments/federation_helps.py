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
and a Markdown table <output-dir>/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

MODEL_KEYS = ("lr", "batch-size", "max-length", "max-new-tokens", "lora-rank", "dataset",
              "dataset-size", "partitioner", "partition-field", "eval-fraction")
BIGBENCH_TASKS = ("linguistic_mappings__plural_json", "linguistic_mappings__past_tense_json",
                  "unit_conversion__unit_addition_same",
                  "modified_arithmetic__three_digit_addition_control")
# a moe arm: (its moe-assign, other run-config settings of its own)
ROUTED = "moe-route=1.0 moe-router-lr=20"
MOE_ARMS = {"moe-learned": ("learned", ""), "moe-cluster": ("cluster", ""),
            "moe-client": ("client", ""),
            "moe-routed": ("client", ROUTED),
            "moe-routed-top1": ("client", f"{ROUTED} moe-top-k=1"),
            "moe-shared": ("client", f"{ROUTED} moe-shared=1"),
            "moe-shared-top1": ("client", f"{ROUTED} moe-shared=1 moe-top-k=1")}
ARMS = ("base", "local", "fedavg", "hetero", "fedsa", *MOE_ARMS, "central")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="families", choices=("families", "bigbench"),
                   help="one built-in family or one BIG-bench task per client")
    p.add_argument("--families", default="arithmetic,units,strings,json",
                   help="built-in task families of --split families; one per client")
    p.add_argument("--bigbench-dir", default="../shared/data/bigbench",
                   help="folder of BIG-bench task files (a clone's bigbench/benchmark_tasks)")
    p.add_argument("--bigbench-tasks", default=",".join(BIGBENCH_TASKS),
                   help="task files of --split bigbench (names without .json), one per client")
    p.add_argument("--clients", type=int, default=None,
                   help="clients (default: one per family or task)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--ranks", default="4,8,16", help="client ranks of the hetero arm")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--dataset-size", type=int, default=480)
    p.add_argument("--test-per-client", type=int, default=20,
                   help="held-out examples of each client in the union test set")
    p.add_argument("--run-config", default="lr=1e-3 batch-size=8 max-length=128 lora-rank=8",
                   help="settings shared by every arm")
    p.add_argument("--moe-experts", type=int, default=4, help="experts of the moe arms")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)}")
    p.add_argument("--output-dir", type=Path, default=Path("results/federation-helps"))
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = len(domains(args))
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {','.join(unknown)}; known: {','.join(ARMS)}")
    return args


def domains(args: argparse.Namespace) -> list[str]:
    """The split's domains: one per client."""
    return (args.families if args.split == "families" else args.bigbench_tasks).split(",")


def bigbench_folder(bigbench_dir: str, tasks: str, output_dir: Path) -> Path:
    """<output_dir>/bigbench-tasks: links to the chosen task files only (a run reads a folder)."""
    source = Path(bigbench_dir).resolve()
    folder = output_dir / "bigbench-tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name in tasks.split(","):
        target = source / f"{name}.json"
        if not target.is_file():
            raise SystemExit(f"--bigbench-tasks: {target} does not exist; the tasks of "
                             f"{source}: {sorted(p.stem for p in source.glob('*.json'))}")
        link = folder / target.name
        if not link.is_symlink():
            link.symlink_to(target)
    return folder.resolve()


def settings_for(args: argparse.Namespace, seed: int):
    from fedlora.cli.runconfig import parse_run_config
    from fedlora.methods import load_settings

    config = parse_run_config(args.run_config)
    dataset = f"builtin:{args.families}"
    if args.split == "bigbench":
        dataset = "bigbench:" + str(bigbench_folder(args.bigbench_dir, args.bigbench_tasks,
                                                    args.output_dir))
    config.update({"model": args.model, "dataset": dataset, "dataset-size": args.dataset_size,
                   "partitioner": "by-field", "partition-field": "task",
                   "eval-fraction": 0.2, "local-steps": args.local_steps,
                   "num-server-rounds": args.rounds, "seed": seed, "device": "cpu"})
    return load_settings(config), config


def client_splits(settings, clients: int, seed: int):
    from fedlora.data import client_records

    return [client_records(settings.data, pid, clients, seed) for pid in range(clients)]


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
    from fedlora.train import train_local

    slot = Workspace().get(settings.model, settings.lora, settings.train)
    shapes = module_shapes(get_lora_state(slot.model, slot.adapter))
    set_lora_state(slot.model, flatten(shared_init(shapes, settings.lora.rank, seed)),
                   slot.adapter)
    examples = tokenize_records(records, slot.tokenizer, settings.train.max_length)
    train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                replace(settings.train, local_steps=steps), server_round=1, num_rounds=1,
                seed=seed, desc=out.name)
    writer = RunWriter(out, lora_config(settings.lora, slot.source.base_id),
                       {"model": settings.model.name, "steps": steps})
    return writer.write_final(get_lora_state(slot.model, slot.adapter), settings.lora.rank)


def simulate(args: argparse.Namespace, config: dict, out: Path, extra: list[str],
             arm_config: str = "") -> Path:
    """A `fedlora simulate` run of the federated arm (`arm_config`: its own run-config
    settings on top of the shared ones); its final adapter."""
    shared = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                      for k, v in config.items() if k in MODEL_KEYS)
    command = [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", args.model,
               "--num-clients", str(args.clients), "--rounds", str(args.rounds),
               "--local-steps", str(args.local_steps), "--output-dir", str(out), "--overwrite",
               "--run-config", f"{shared} seed={config['seed']} fraction-evaluate=0.0 "
               f"eval-accuracy=0 {arm_config}", *extra]
    subprocess.run(command, check=True)
    return out / "final"


def score(settings, adapter: Path | None, test: list[dict]) -> dict:
    """Exact-match accuracy (overall and per family) of base + adapter on `test`, with the
    adapter's folder (its run) and every scored answer, so that a number can be checked."""
    from peft import PeftModel

    from fedlora.models import load_model
    from fedlora.train.accuracy import exact_match, scored_answers

    model, tokenizer, _ = load_model(settings.model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    accuracy, answers = exact_match(model, tokenizer, test, settings.data.dataset,
                                    settings.train.max_new_tokens, batch_size=16)
    return {**accuracy.metrics(), "adapter": str(adapter) if adapter else None,
            "answers": scored_answers(test, answers, settings.data.dataset)}


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


def write_results(args: argparse.Namespace, results: dict, extra: dict | None = None) -> Path:
    """<output-dir>/results.json: the arguments, any `extra` fields and the results so far
    (rewritten after each seed, so a run stopped half-way keeps what it measured)."""
    path = args.output_dir / "results.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                **(extra or {}), "results": results}, indent=1) + "\n")
    return path


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
