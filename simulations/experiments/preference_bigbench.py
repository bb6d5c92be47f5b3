"""What does federated DPO buy over supervised fine-tuning? BIG-bench multiple choice as
preference data, one task per site, scored by multiple-choice accuracy.

    python -m simulations.experiments.preference_bigbench --output-dir results/preference
    python -m simulations.experiments.preference_bigbench --short --output-dir /tmp/pref

Data: each `--tasks` file of `--bigbench-dir` (multiple-choice BIG-bench tasks) is one site's.
Per task, the last `--test-per-task` questions are the held-out test (never trained); of the
rest, at most `--train-per-task`. A question becomes an SFT record (its right answer) or a
preference pair (the right choice as chosen, a wrong one drawn with the seed as rejected:
`fedlora.data.preference.bigbench_pairs`).

Arms, each through the real ServerApp and ClientApp in one process (simulations.inprocess),
`--rounds` x `--local-steps` per site, per seed:

- base:     the pretrained model;
- sft:      FedAvg, objective=sft on the right answers;
- dpo:      FedAvg, objective=dpo on the pairs;
- sft-dpo:  the sft arm's adapter, then as many DPO rounds from it (init-adapter);
- local:    each site alone, objective=dpo on its own pairs (its adapter scored on every
            task: what a site gets without the federation; each site's figure kept; not on
            MMLU, which is there for the adapters a federation shares);
- central:  one node holding every site's pairs, objective=dpo, the sites' steps together.

Scoring: every test question's choices by their log-likelihood after the prompt (as BIG-bench
scores multiple choice, `fedlora.train.choices`), accuracy overall and per task; and MMLU
(`--mmlu`, the first `--mmlu-limit` questions; `simulations.experiments.general_knowledge`)
to show general knowledge is kept. Every scored answer, with its log-likelihoods, goes to
<output-dir>/seed-N/results.json (rewritten after each arm; `--resume` keeps the arms done), and
all seeds together to <output-dir>/results.json and a table to results.md. Seeds can run as
separate processes into one --output-dir (`--seeds 0` and `--seeds 1` side by side, one thread
each); the last to finish, or `--report-only`, reports them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TASKS = ("cs_algorithms__valid_parentheses", "date_understanding", "multiemo__all_sentence_en",
         "sports_understanding")
ARMS = ("base", "sft", "dpo", "sft-dpo", "local", "central")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bigbench-dir", default="../shared/data/bigbench")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="multiple-choice task files (names without .json), one per site")
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--run-config", default="lr=5e-4 batch-size=4 max-length=192 lora-rank=8 "
                                           "dpo-beta=0.1", help="settings shared by every arm")
    p.add_argument("--mmlu", type=Path, default=Path("../shared/data/mmlu_subset_1444.json"))
    p.add_argument("--mmlu-limit", type=int, default=200, help="0 = skip MMLU")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--resume", action="store_true",
                   help="keep the arms a seed already has in <output-dir>/seed-N/results.json")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild results.json and results.md from the seeds' files (seeds "
                        "run by separate processes into one --output-dir)")
    p.add_argument("--short", action="store_true",
                   help="smoke run: tiny-llama, 2 tasks, 1 round of 2 steps, one seed")
    args = p.parse_args(argv)
    if args.short:
        args.model, args.rounds, args.local_steps, args.seeds = "tiny-llama", 1, 2, "0"
        args.train_per_task, args.test_per_task = 16, 8
        if args.tasks == ",".join(TASKS):
            args.tasks = "sports_understanding,date_understanding"
        args.mmlu_limit = min(args.mmlu_limit, 8)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {','.join(unknown)}; known: {','.join(ARMS)}")
    return args


def task_split(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(training questions, test questions) of every task, multiple choice only."""
    from fedlora.data.bigbench import load_bigbench

    train, test = [], []
    for name in args.tasks.split(","):
        path = Path(args.bigbench_dir) / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--tasks: {path} does not exist")
        records = [r for r in load_bigbench(str(path)) if r.get("choices")]
        if len(records) <= args.test_per_task:
            raise SystemExit(f"{name}: {len(records)} multiple-choice questions, not more than "
                             f"--test-per-task={args.test_per_task}")
        test += records[-args.test_per_task:]
        train += records[:-args.test_per_task][:args.train_per_task]
    return train, test


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def sft_records(questions: list[dict]) -> list[dict]:
    """The questions as instruction/output records (their right answer), task kept."""
    return [{"instruction": q["instruction"], "output": q["output"], "task": q["task"]}
            for q in questions]


def run(config: dict, nodes: int, out: Path) -> Path:
    """One federation in this process; its final adapter."""
    from simulations.inprocess import run_inprocess

    run_inprocess({**config, "output-dir": str(out), "min-available-nodes": nodes,
                   "min-train-nodes": nodes, "min-evaluate-nodes": nodes}, nodes)
    return out / "final"


def score_choices(model, tokenizer, test: list[dict]) -> dict:
    """Accuracy (overall, per task) of the most likely choice, and every answer."""
    from fedlora.data import to_messages
    from fedlora.inference import chat_prompt
    from fedlora.train.choices import best_choice, pad_id, row_logliks, targets_of, token_ids

    rows = []
    for q in test:
        prompt = token_ids(tokenizer, chat_prompt(to_messages(q)[:-1], tokenizer))
        rows += [(prompt, token_ids(tokenizer, c)) for c in q["choices"]]
    scores, start, answers = row_logliks(model, rows, pad_id(tokenizer), 16), 0, []
    for q in test:
        logliks = scores[start:start + len(q["choices"])]
        start += len(q["choices"])
        pick = q["choices"][best_choice(logliks)]
        answers.append({"task": q["task"], "question": q["instruction"][-200:],
                        "expected": targets_of(q), "answer": pick,
                        "correct": pick in targets_of(q), "logliks": logliks})
    tasks: dict[str, list[bool]] = {}
    for a in answers:
        tasks.setdefault(a["task"], []).append(a["correct"])
    return {"accuracy": statistics.mean(a["correct"] for a in answers),
            "per-task": {t: statistics.mean(v) for t, v in sorted(tasks.items())},
            "answers": answers}


def score(args: argparse.Namespace, adapter: Path | None, test: list[dict],
          mmlu: list[dict]) -> dict:
    """An adapter (None: the base model) on the test questions and on MMLU."""
    from peft import PeftModel

    from fedlora.config import ModelSettings
    from fedlora.models import load_model
    from simulations.experiments.general_knowledge import score_model

    model, tokenizer, _ = load_model(ModelSettings(name=args.model, device="cpu"))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = {"adapter": str(adapter) if adapter else None,
           "choices": score_choices(model, tokenizer, test)}
    if mmlu:
        out["mmlu"] = score_model(model, tokenizer, mmlu, 16)
    return out


def arm_adapters(arm: str, args: argparse.Namespace, base: dict, sites: list[list[dict]],
                 files: dict[str, str], out: Path) -> list[Path | None]:
    """Train `arm` (seed in `base`); its adapters (one, or one per site for local)."""
    steps, rounds = args.local_steps, args.rounds
    fed = {**base, "partitioner": "by-field", "partition-field": "task"}
    if arm == "base":
        return [None]
    if arm == "sft":
        return [run({**fed, "dataset": files["sft"], "objective": "sft"}, len(sites),
                    out / "sft")]
    if arm == "dpo":
        return [run({**fed, "dataset": files["pairs"], "objective": "dpo"}, len(sites),
                    out / "dpo")]
    if arm == "sft-dpo":
        first = out / "sft" / "final"
        if not first.is_dir():
            first = run({**fed, "dataset": files["sft"], "objective": "sft"}, len(sites),
                        out / "sft")
        return [run({**fed, "dataset": files["pairs"], "objective": "dpo",
                     "init-adapter": str(first)}, len(sites), out / "sft-dpo")]
    if arm == "local":
        return [run({**base, "dataset": write_jsonl(out / "local" / f"site-{i}.jsonl", pairs),
                     "objective": "dpo"}, 1, out / "local" / f"site-{i}")
                for i, pairs in enumerate(sites)]
    # central: every site's pairs on one node, the sites' steps together
    return [run({**base, "dataset": files["pairs"], "objective": "dpo",
                 "local-steps": steps * len(sites), "num-server-rounds": rounds}, 1,
                out / "central")]


def mean_of(results: list[dict], key: str) -> float:
    return statistics.mean(r[key]["accuracy"] for r in results)


def seed_file(output_dir: Path, seed: int) -> Path:
    return output_dir / f"seed-{seed}" / "results.json"


def report(output_dir: Path, arms: list[str]) -> str:
    """results.json (every seed's arms) and results.md (the table) from each seed's file, so
    seeds run by separate processes into one --output-dir are reported together."""
    seeds = {}
    for path in sorted(output_dir.glob("seed-*/results.json")):
        done = json.loads(path.read_text())
        seeds[str(done["seed"])] = done
    if not seeds:
        raise SystemExit(f"{output_dir}: no seed-*/results.json to report")
    first = next(iter(seeds.values()))
    (output_dir / "results.json").write_text(json.dumps(
        {"args": first["args"], "questions": first["questions"],
         "results": {s: d["arms"] for s, d in seeds.items()}}, indent=1) + "\n")
    q, a = first["questions"], first["args"]
    names = ", ".join(sorted(seeds))
    lines = [f"{q['test']} test questions of {a['tasks']} (multiple choice, most likely "
             f"choice); MMLU {q['mmlu']} questions; {a['model']}, {a['rounds']} rounds x "
             f"{a['local_steps']} steps; seeds {names}", "",
             "| arm | choice accuracy, mean | per seed | MMLU, mean |", "|---|---:|---|---:|"]
    for arm in arms:
        runs = [d["arms"][arm] for d in seeds.values() if arm in d["arms"]]
        if not runs:
            continue
        acc = [r["choice-accuracy"] for r in runs]
        mm = [r["mmlu-accuracy"] for r in runs if "mmlu-accuracy" in r]
        lines.append(f"| {arm} | {statistics.mean(acc):.3f} | "
                     + " / ".join(f"{x:.3f}" for x in acc)
                     + (f" | {statistics.mean(mm):.3f} |" if mm else " | - |"))
    lines += per_task(seeds, arms) + held_out_pairs(output_dir, seeds, arms)
    text = "\n".join(lines) + "\n"
    (output_dir / "results.md").write_text(text)
    return text


def per_task(seeds: dict, arms: list[str]) -> list[str]:
    """Choice accuracy per task and arm (mean over seeds and, for local, over the sites)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for arm in arms:
        for done in seeds.values():
            for run in done["arms"].get(arm, {}).get("runs", []):
                for task, acc in run["choices"]["per-task"].items():
                    cells.setdefault(arm, {}).setdefault(task, []).append(acc)
    tasks = sorted({t for by_task in cells.values() for t in by_task})
    if not tasks:
        return []
    out = ["", "Per task (mean over seeds; local: over the sites too):", "",
           "| arm | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    own: dict[str, list[float]] = {}  # local: site i (sorted tasks) on its own task i
    for done in seeds.values():
        for task, run in zip(tasks, done["arms"].get("local", {}).get("runs", [])):
            own.setdefault(task, []).append(run["choices"]["per-task"][task])
    if own:
        cells["local, each site on its own task"] = own
    for arm, by_task in cells.items():
        out.append(f"| {arm} | " + " | ".join(
            f"{statistics.mean(by_task[t]):.3f}" if t in by_task else "-" for t in tasks) + " |")
    return out


def held_out_pairs(output_dir: Path, seeds: dict, arms: list[str]) -> list[str]:
    """Each DPO federation's held-out preference figures after its last round (the nodes'
    evaluation, metrics.jsonl), mean over seeds."""
    rows = []
    for arm in (a for a in arms if a in ("dpo", "sft-dpo", "central")):
        last = []
        for seed in seeds:
            metrics = output_dir / f"seed-{seed}" / arm / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            scored = [json.loads(x) for x in lines if "pref-margin" in json.loads(x)]
            if scored:
                last.append(scored[-1])
        if last:
            rows.append(f"| {arm} | {statistics.mean(r['pref-accuracy'] for r in last):.3f} | "
                        f"{statistics.mean(r['pref-margin'] for r in last):.3f} | "
                        f"{statistics.mean(r['pref-pairs'] for r in last):.0f} |")
    if not rows:
        return []
    return ["", "Held-out pairs of the sites' own tasks after the last round (the nodes' "
            "evaluation; accuracy: chosen reward above rejected; margin in beta units):", "",
            "| arm | preference accuracy | margin | pairs |", "|---|---:|---:|---:|", *rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = args.arms.split(",")
    if args.report_only:
        print(report(args.output_dir, arms), end="")
        return 0
    from fedlora.cli.runconfig import parse_run_config
    from fedlora.data.preference import bigbench_pairs
    from simulations.experiments.general_knowledge import load_mmlu

    train, test = task_split(args)
    mmlu = load_mmlu(args.mmlu)[:args.mmlu_limit] if args.mmlu_limit else []
    started = time.perf_counter()
    shown = {k: str(v) for k, v in vars(args).items() if k not in ("seeds", "resume")}
    questions = {"train": len(train), "test": len(test), "mmlu": len(mmlu)}
    for seed in map(int, args.seeds.split(",")):
        out = args.output_dir / f"seed-{seed}"
        done: dict = {}
        if args.resume and seed_file(args.output_dir, seed).is_file():
            kept = json.loads(seed_file(args.output_dir, seed).read_text())
            if kept["args"] != shown or kept["questions"] != questions:
                raise SystemExit(f"--resume: {seed_file(args.output_dir, seed)} was made with "
                                 "other arguments; use another --output-dir or drop --resume")
            done = kept["arms"]
        pairs = [{k: v for k, v in p.items() if k != "chat"}
                 for p in bigbench_pairs(train, seed)]
        files = {"sft": write_jsonl(out / "sft.jsonl", sft_records(train)),
                 "pairs": write_jsonl(out / "pairs.jsonl", pairs)}
        sites = [[p for p in pairs if p["task"] == t] for t in sorted({p["task"] for p in pairs})]
        base = {**parse_run_config(args.run_config), "model": args.model, "device": "cpu",
                "seed": seed, "local-steps": args.local_steps,
                "num-server-rounds": args.rounds, "eval-fraction": 0.1, "eval-examples": 16,
                "eval-accuracy": 0, "initial-eval": False}
        for arm in arms:
            if arm in done:
                print(f"seed {seed} {arm:8s} kept from {seed_file(args.output_dir, seed)}",
                      file=sys.stderr, flush=True)
                continue
            began = time.perf_counter()
            general = mmlu if arm != "local" else []  # MMLU: the federation's adapters
            scored = [score(args, a, test, general)
                      for a in arm_adapters(arm, args, base, sites, files, out)]
            entry: dict = {"choice-accuracy": mean_of(scored, "choices"), "runs": scored}
            if general:
                entry["mmlu-accuracy"] = mean_of(scored, "mmlu")
            entry["seconds"] = time.perf_counter() - began
            done[arm] = entry
            print(f"seed {seed} {arm:8s} choice accuracy {entry['choice-accuracy']:.3f}"
                  + (f"  MMLU {entry['mmlu-accuracy']:.3f}" if general else "")
                  + f"  ({entry['seconds']:.0f} s)", file=sys.stderr, flush=True)
            seed_file(args.output_dir, seed).write_text(json.dumps(
                {"args": shown, "questions": questions, "seed": seed, "arms": done},
                indent=1) + "\n")
    print(report(args.output_dir, arms), end="")
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
