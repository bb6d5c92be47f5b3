"""Does federated continued pre-training on the sites' unlabelled text lower held-out perplexity?

    python -m simulations.experiments.continued_pretraining --output-dir results/cpt
    python -m simulations.experiments.continued_pretraining --short --output-dir /tmp/cpt

The domain corpus is the inputs of BIG-bench tasks (`--bigbench-dir`, every task file in it
unless `--tasks`), the questions alone, no answers: each task's inputs are joined, in their
order, into documents of `--inputs-per-doc` inputs, one text record each (`{"text", "task"}`,
the text form of fedlora.data.loaders). Per task, the last `--held-out` share of its documents
is held out; the rest is the training corpus, split over `--clients` sites by task
(`partitioner=by-field` over `task`: each site holds its own tasks' text, non-IID).

Arms, scored the same way (token-weighted mean next-token loss over every token of the
held-out documents, fedlora.train.evaluate, and its perplexity):

- base:      the pretrained model, no adapter;
- federated: `--rounds` rounds of FedAvg, `--local-steps` steps per site per round, packed
             text (`packing=true`, examples kept apart), through the real ServerApp and
             ClientApp in one process (simulations.inprocess), its final adapter scored;
- local:     each site alone on its own share (the same by-field split), for the same
             `--rounds` x `--local-steps` steps; each site's adapter is scored on the whole
             held-out set, and the arm is their token-weighted mean (what a site gets
             without the federation), with each site's own figure kept.

Results go to <output-dir>/results.json (the arguments, each arm's loss and perplexity, the
federation's per-round metrics) and the corpus to <output-dir>/corpus/. `--short` is a smoke
run: tiny-llama (random weights: its perplexity says only that training lowers it), two
sites, one round of a few steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

DEFAULT_BIGBENCH = "/work/shared/data/bigbench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bigbench-dir", default=DEFAULT_BIGBENCH,
                   help="folder of BIG-bench task .json files (the domain corpus)")
    p.add_argument("--tasks", default="",
                   help="comma-separated task file names without .json (default: all)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--inputs-per-doc", type=int, default=8)
    p.add_argument("--held-out", type=float, default=0.2,
                   help="share of each task's documents held out (scored, never trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--short", action="store_true",
                   help="smoke run: tiny-llama, 2 sites, 1 round of 4 steps, 2 tasks")
    args = p.parse_args(argv)
    if args.short:
        args.model, args.clients, args.rounds, args.local_steps = "tiny-llama", 2, 1, 4
        args.lr, args.max_length, args.device = 1e-2, 128, "cpu"
        args.tasks = args.tasks or "date_understanding,sports_understanding"
    if args.clients < 1 or args.rounds < 1 or args.local_steps < 1:
        p.error("--clients, --rounds and --local-steps must be >= 1")
    if not 0 < args.held_out < 1:
        p.error(f"--held-out must be in (0, 1), got {args.held_out}")
    return args


def task_files(folder: Path, tasks: str) -> list[Path]:
    """The task files of `folder`, or those named in `tasks`."""
    if not folder.is_dir():
        raise SystemExit(f"--bigbench-dir {folder} is not a folder of BIG-bench task files")
    if not tasks:
        return sorted(folder.glob("*.json"))
    files = [folder / f"{name.strip()}.json" for name in tasks.split(",") if name.strip()]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--tasks: no {', '.join(missing)} in {folder}; it holds "
                         f"{', '.join(sorted(f.stem for f in folder.glob('*.json')))}")
    return files


def documents(path: Path, per_doc: int) -> list[dict]:
    """A task's example inputs joined into text records of `per_doc` inputs each."""
    inputs = [str(e["input"]).strip() for e in json.loads(path.read_text())["examples"]
              if str(e.get("input", "")).strip()]
    return [{"text": "\n\n".join(inputs[i:i + per_doc]), "task": path.stem}
            for i in range(0, len(inputs), per_doc)]


def corpus(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out documents): per task, its last --held-out share held out."""
    train, held_out = [], []
    for path in task_files(Path(args.bigbench_dir), args.tasks):
        docs = documents(path, args.inputs_per_doc)
        cut = len(docs) - max(1, round(args.held_out * len(docs)))
        if cut < 1:
            raise SystemExit(f"{path.name}: {len(docs)} documents, too few to hold some out; "
                             f"lower --inputs-per-doc")
        train += docs[:cut]
        held_out += docs[cut:]
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def held_out_loss(args: argparse.Namespace, adapter: Path | None, held_out: list[dict]) -> dict:
    """Mean next-token loss and perplexity over every token of the held-out documents."""
    from peft import PeftModel

    from fedlora.config import ModelSettings
    from fedlora.data import tokenize_records
    from fedlora.models import load_model
    from fedlora.train import evaluate

    model, tokenizer, _ = load_model(ModelSettings(name=args.model, device=args.device))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    examples = tokenize_records(held_out, tokenizer, args.max_length)
    result = evaluate(model, examples, tokenizer.pad_token_id, batch_size=args.batch_size)
    return {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}


def federate(args: argparse.Namespace, train_file: Path, out: Path) -> list[dict]:
    """FedAvg over the sites' text, in one process; its metrics rows."""
    from fedlora.outputs import read_metrics
    from simulations.inprocess import run_inprocess

    run_inprocess({"model": args.model, "device": args.device, "dataset": str(train_file),
                   "partitioner": "by-field", "partition-field": "task", "packing": True,
                   "eval-fraction": 0.05, "max-length": args.max_length,
                   "batch-size": args.batch_size, "lora-rank": args.lora_rank, "lr": args.lr,
                   "local-steps": args.local_steps, "num-server-rounds": args.rounds,
                   "min-available-nodes": args.clients, "seed": args.seed,
                   "output-dir": str(out)}, args.clients)
    return read_metrics(out)


def site_shares(args: argparse.Namespace, train: list[dict]) -> list[list[dict]]:
    """Each site's training documents under the federation's by-field split of `task`."""
    from fedlora.data.partition import by_field_partition

    parts = by_field_partition([d["task"] for d in train], args.clients, args.seed)
    return [[train[i] for i in part] for part in parts]


def local_only(args: argparse.Namespace, train: list[dict], held_out: list[dict],
               out: Path) -> dict:
    """Every site trained alone (one node, its own share, the federation's steps), scored on
    the whole held-out set; the token-weighted mean over the sites, and each site's."""
    from simulations.inprocess import run_inprocess

    sites = []
    for pid, share in enumerate(site_shares(args, train)):
        folder = out / "local" / f"site-{pid}"
        write_jsonl(folder / "train.jsonl", share)
        run_inprocess({"model": args.model, "device": args.device,
                       "dataset": str(folder / "train.jsonl"), "packing": True,
                       "eval-fraction": 0.05, "max-length": args.max_length,
                       "batch-size": args.batch_size, "lora-rank": args.lora_rank,
                       "lr": args.lr, "local-steps": args.local_steps,
                       "num-server-rounds": args.rounds, "min-available-nodes": 1,
                       "min-train-nodes": 1, "min-evaluate-nodes": 1, "initial-eval": False,
                       "seed": args.seed, "output-dir": str(folder)}, 1)
        sites.append({"tasks": sorted({d["task"] for d in share}),
                      **held_out_loss(args, folder / "final", held_out)})
    tokens = sum(s["tokens"] for s in sites)
    loss = sum(s["loss"] * s["tokens"] for s in sites) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "sites": sites}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train, held_out = corpus(args)
    write_jsonl(out / "corpus" / "train.jsonl", train)
    write_jsonl(out / "corpus" / "held-out.jsonl", held_out)
    print(f"corpus: {len(train)} training and {len(held_out)} held-out documents of "
          f"{len({d['task'] for d in train})} tasks over {args.clients} sites")
    started = time.perf_counter()
    results: dict = {"base": held_out_loss(args, None, held_out)}
    rows = federate(args, out / "corpus" / "train.jsonl", out / "federated")
    results["federated"] = held_out_loss(args, out / "federated" / "final", held_out)
    results["local"] = local_only(args, train, held_out, out)
    seconds = time.perf_counter() - started
    for arm, r in results.items():
        print(f"{arm:10s} held-out loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}")
    drop = results["base"]["loss"] - results["federated"]["loss"]
    gain = results["local"]["loss"] - results["federated"]["loss"]
    print(f"federated continued pre-training lowers held-out loss by {drop:.4f} against the "
          f"base (perplexity x{math.exp(-drop):.3f}) and by {gain:.4f} against local-only "
          f"(x{math.exp(-gain):.3f}); {seconds:.0f} s")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "results": results, "seconds": seconds,
         "documents": {"train": len(train), "held-out": len(held_out)}, "rounds": rows},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
