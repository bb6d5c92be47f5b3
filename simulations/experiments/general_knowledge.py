"""General knowledge kept? The base model and federated adapters on an MMLU subset.

    python -m simulations.experiments.general_knowledge \
        --data ../shared/data/mmlu_subset_1444.json \
        --adapter fedavg=results/federation-helps/seed-0/fedavg/final \
        --output-dir results/general-knowledge

A fine-tune that damages what the model knew should show it here. Each question (MMLU's
`instruction` + `input` with the options A-D; `output` = "The answer is: X. ...") is asked as
training formats a question (the chat template's user turn), the assistant's turn is begun
with "The answer is:", and the option letter with the highest log-likelihood is the model's
answer (`fedlora.train.choices`' log-likelihoods of " A", " B", " C", " D"): MMLU's usual
scoring, no generation. The base model is always scored; each `--adapter NAME=PATH` is loaded
on it with `PeftModel.from_pretrained`. Results: <output-dir>/results.json (per model: accuracy
overall and per subject, and every answer: question, expected, answer, correct, the four
log-likelihoods) and a Markdown table <output-dir>/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from fedlora.cli.exposure import adapters_of

LETTERS = ("A", "B", "C", "D")
ANSWER_PREFIX = "The answer is:"
ANSWER = re.compile(r"^\s*The answer is:\s*([ABCD])\b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/mmlu_subset_1444.json"),
                   help="MMLU-style JSON list (instruction, input, output, class)")
    p.add_argument("--model", default="smollm2-135m", help="the base model of the adapters")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT adapter folder to score on the base model (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--output-dir", type=Path, default=Path("results/general-knowledge"))
    return p.parse_args(argv)


def load_mmlu(path: Path) -> list[dict]:
    """The questions of an MMLU-style file, each with its `answer` letter and `subject`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass --data with an MMLU-style JSON "
                                f"list (e.g. ../shared/data/mmlu_subset_1444.json)")
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(rows).__name__}")
    records = []
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "input", "output") if not isinstance(
            row.get(k) if isinstance(row, dict) else None, str)]
        if missing:
            raise ValueError(f"{path}: question {i}: expected text fields instruction, input "
                             f"and output; missing or not text: {missing}")
        match = ANSWER.match(row["output"])
        if match is None:
            raise ValueError(f"{path}: question {i}: field 'output' should start with "
                             f"'{ANSWER_PREFIX} <A-D>', got {row['output'][:60]!r}")
        records.append({"instruction": row["instruction"], "input": row["input"],
                        "output": row["output"], "answer": match.group(1),
                        "subject": str(row.get("class", "all"))})
    return records


def score_model(model, tokenizer, records: list[dict], batch_size: int) -> dict:
    """Accuracy overall and per subject of the most likely option letter, and every answer."""
    from fedlora.data import to_messages
    from fedlora.inference import chat_prompt
    from fedlora.train.choices import best_choice, pad_id, row_logliks, token_ids

    letters = [token_ids(tokenizer, " " + c) for c in LETTERS]
    rows = []  # every question's four (prompt, letter) rows, scored batch_size at a time
    for record in records:
        prompt = token_ids(tokenizer, chat_prompt(to_messages(record)[:-1], tokenizer)
                           + ANSWER_PREFIX)
        rows += [(prompt, letter) for letter in letters]
    scores = row_logliks(model, rows, pad_id(tokenizer), batch_size)
    answers = []
    for i, record in enumerate(records):
        logliks = scores[4 * i: 4 * i + 4]
        pick = LETTERS[best_choice(logliks)]
        answers.append({"question": record["input"], "subject": record["subject"],
                        "expected": record["answer"], "answer": pick,
                        "correct": pick == record["answer"], "logliks": logliks})
    subjects: dict[str, list[bool]] = {}
    for a in answers:
        subjects.setdefault(a["subject"], []).append(a["correct"])
    return {"accuracy": statistics.mean(a["correct"] for a in answers) if answers else 0.0,
            "questions": len(answers),
            "per-subject": {s: statistics.mean(v) for s, v in sorted(subjects.items())},
            "answers": answers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        adapters = adapters_of(args.adapter)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    records = load_mmlu(args.data)
    records = records[: args.limit] if args.limit else records
    from peft import PeftModel

    from fedlora.config import ModelSettings
    from fedlora.models import load_model

    results = {}
    for name, folder in {"base": None, **adapters}.items():
        started = time.perf_counter()
        model, tokenizer, _ = load_model(ModelSettings(name=args.model, device="cpu"))
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder))
        results[name] = {"adapter": str(folder) if folder else None,
                         **score_model(model.eval(), tokenizer, records, args.batch_size)}
        print(f"{name}: accuracy {results[name]['accuracy']:.3f} on {len(records)} questions "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    lines = [f"{len(records)} questions of {args.data.name}, model {args.model}; accuracy of "
             f"the most likely option letter", "", "| model | accuracy | change vs base |",
             "|---|---:|---:|"]
    base = results["base"]["accuracy"]
    lines += [f"| {name} | {r['accuracy']:.3f} | {r['accuracy'] - base:+.3f} |"
              for name, r in results.items()]
    text = "\n".join(lines) + "\n"
    (args.output_dir / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
