"""What the experiments share: their settings, their federations, their scoring, their results.

One domain per client (`partitioner=by-field` over the records' `task`): a family of the
built-in task suite, or a real BIG-bench task from a folder of task files. Used by
simulations/experiments/federation_helps.py (and moe_routing.py, which reads its runs with the
same flags) and benchmarks/strategy_comparison.py; none of them imports another.

- the federation experiment's flags and arms (`parse_args`, `ARMS`, `MOE_ARMS`) and its
  settings (`settings_for`);
- a split's settings: its dataset (`split_dataset`, with `bigbench_folder`) and the run config
  around it (`domain_config`), each client's train and held-out records (`client_splits`);
- a federation: the `fedlora simulate` command (`SIMULATE`) and its run config as text
  (`run_config_text`);
- scoring: base model + adapter (`load_scored`), its exact-match answers (`exact_answers`);
- results: <output-dir>/results.json (`write_results`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `fedlora simulate` in a process of its own (one federation, its output in --output-dir)
SIMULATE = [sys.executable, "-m", "fedlora.cli.main", "simulate"]

# the federation experiment (federation_helps.py)
TITLE = ("Does federation help? Local-only vs FedAvg vs a rank-heterogeneous strategy vs "
         "centralised.")
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
    """The flags of the federation experiment (federation_helps, moe_routing)."""
    p = argparse.ArgumentParser(description=TITLE,
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


def split_dataset(split: str, families: str, bigbench_dir: str, bigbench_tasks: str,
                  output_dir: Path) -> str:
    """The dataset setting of a split: the built-in `families`, or the folder of the chosen
    BIG-bench tasks; a ValueError for another split."""
    if split == "families":
        return f"builtin:{families}"
    if split == "bigbench":
        return f"bigbench:{bigbench_folder(bigbench_dir, bigbench_tasks, output_dir)}"
    raise ValueError(f"unknown split {split!r}; known: families, bigbench")


def domain_config(run_config: str, model: str, dataset: str, seed: int, local_steps: int,
                 rounds: int, dataset_size: int | None = None) -> dict:
    """`run_config` (Flower style) with one domain per client of `dataset` (by-field over the
    records' task, 20 % of each held out) and the run's model, seed and budget."""
    from fedlora.cli.runconfig import parse_run_config

    config = parse_run_config(run_config)
    config.update({"model": model, "dataset": dataset,
                   **({} if dataset_size is None else {"dataset-size": dataset_size}),
                   "partitioner": "by-field", "partition-field": "task", "eval-fraction": 0.2,
                   "local-steps": local_steps, "num-server-rounds": rounds, "seed": seed})
    return config


def settings_for(args: argparse.Namespace, seed: int):
    """The federation experiment's settings (on the CPU) for `seed`, and its run config."""
    from fedlora.methods import load_settings

    dataset = split_dataset(args.split, args.families, args.bigbench_dir, args.bigbench_tasks,
                            args.output_dir)
    config = domain_config(args.run_config, args.model, dataset, seed, args.local_steps,
                          args.rounds, dataset_size=args.dataset_size)
    config["device"] = "cpu"
    return load_settings(config), config


def client_splits(settings, clients: int, seed: int):
    """(train, held-out) records of each client."""
    from fedlora.data import client_records

    return [client_records(settings.data, pid, clients, seed) for pid in range(clients)]


def run_config_text(config: dict, keys: tuple[str, ...] | None = None) -> str:
    """`config` (only `keys`, if given) as a --run-config string: KEY=VALUE, strings quoted."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                    for k, v in config.items() if keys is None or k in keys)


def load_scored(settings, adapter: Path | None):
    """The base model of `settings`, with `adapter` on it if given, and its tokenizer."""
    from peft import PeftModel

    from fedlora.models import load_model

    model, tokenizer, _ = load_model(settings.model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model, tokenizer


def exact_answers(settings, model, tokenizer, test: list[dict]):
    """Greedy answers of `model` on `test`: exact-match accuracy and every scored answer."""
    from fedlora.train.accuracy import exact_match, scored_answers

    accuracy, answers = exact_match(model, tokenizer, test, settings.data.dataset,
                                    settings.train.max_new_tokens, batch_size=16)
    return accuracy, scored_answers(test, answers, settings.data.dataset)


def write_results(args: argparse.Namespace, results: dict, extra: dict | None = None) -> Path:
    """<output-dir>/results.json: the arguments, any `extra` fields and the results so far
    (rewritten after each seed, so a run stopped half-way keeps what it measured)."""
    path = args.output_dir / "results.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                **(extra or {}), "results": results}, indent=1) + "\n")
    return path
