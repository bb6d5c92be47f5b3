"""Generation-based exact-match accuracy, per task family.

Only records that name their scorer are answered by default (`exact-match=auto`,
`scored_records`): a built-in task's (its family by the dataset's or the record's `task`),
BIG-bench's (a `targets` list) and a record with a `scorer` field; open-ended data of one's
own has no answer a trimmed equality would match, so it gets eval loss and perplexity only,
unless `exact-match=all`.

A record's prompt (every message but the answer, formatted exactly as training formats it) is
given to the model, the greedy continuation is scored by the record's family scorer
(`fedlora.data.score_answer`: numbers as numbers, JSON as parsed JSON, ...) or by trimmed
equality for data without a family. Counts per family travel as metrics
(`correct/<family>`, `total/<family>`), so the server can pool them over clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.config import EXACT_MATCH
from fedlora.data import score_answer, to_messages
from fedlora.data.format import is_raw, is_text
from fedlora.data.tasks import family_of
from fedlora.inference import chat_prompt, generate
from fedlora.train.progress import Ticker
from fedlora.wire import SAMPLE_FIELDS

OTHER = "other"  # records of data without a task family
MAX_COUNT = 1_000_000  # more answers than a node can score in a round: a broken reply


@dataclass
class Accuracy:
    """Counts of right answers per family: exact matches of generated answers (kind ""), or
    of the most likely choice of multiple-choice records (kind "choice", fedlora.train.choices)."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    kind: str = ""
    # exact_match's first answers per family (`sample_answers`), for the report
    samples: list[dict] = field(default_factory=list, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The metric's name: accuracy, or choice-accuracy."""
        return f"{self.kind}-accuracy" if self.kind else "accuracy"

    @property
    def prefix(self) -> str:
        """Of the count keys: '' or 'choice-' (choice-correct/<family>, ...)."""
        return f"{self.kind}-" if self.kind else ""

    def add(self, family: str, right: bool) -> None:
        self.total[family] = self.total.get(family, 0) + 1
        self.correct[family] = self.correct.get(family, 0) + int(right)

    def merge(self, other: Accuracy) -> Accuracy:
        out = Accuracy(dict(self.correct), dict(self.total), self.kind)
        for family, n in other.total.items():
            out.total[family] = out.total.get(family, 0) + n
            out.correct[family] = out.correct.get(family, 0) + other.correct.get(family, 0)
        return out

    @property
    def overall(self) -> float:
        n = sum(self.total.values())
        return sum(self.correct.values()) / n if n else float("nan")

    def metrics(self) -> dict[str, float]:
        """{"accuracy": overall, "accuracy/<family>": ...} (a family only when several);
        choice-accuracy for kind "choice"."""
        out = {self.name: self.overall}
        if len(self.total) > 1 or OTHER not in self.total:
            out.update({f"{self.name}/{f}": self.correct[f] / self.total[f]
                        for f in sorted(self.total)})
        return out

    def counts(self) -> dict[str, int]:
        """Flat counts for a Flower MetricRecord: correct/<family>, total/<family> (with the
        kind's prefix: choice-correct/<family>, ...)."""
        out = {f"{self.prefix}correct/{f}": n for f, n in self.correct.items()}
        out.update({f"{self.prefix}total/{f}": n for f, n in self.total.items()})
        return out

    @classmethod
    def from_counts(cls, metrics: dict, kind: str = "") -> Accuracy:
        """The inverse of `counts` for counts of `kind` (other keys are ignored)."""
        acc = cls(kind=kind)
        total_key, correct_key = f"{acc.prefix}total/", f"{acc.prefix}correct/"
        for key, value in metrics.items():
            if key.startswith(total_key):
                family = key.removeprefix(total_key)
                right = metrics.get(f"{correct_key}{family}", 0)
                # a node's counts are not trusted: only whole, consistent ones are pooled
                if all(isinstance(v, int) and not isinstance(v, bool) for v in (value, right)) \
                        and 0 <= right <= value <= MAX_COUNT and value > 0:
                    acc.total[family], acc.correct[family] = value, right
        return acc


def generation_batch(settings) -> int:
    """Prompts generated at once: at least 16 (no gradients or optimizer state to hold)."""
    return max(16, settings.train.batch_size)


def question_prompt(record: dict, tokenizer) -> str:
    """A record's prompt as training formats it: a raw prompt/completion pair's prompt as it
    is (training adds no template to it either), else the chat (or plain) template of every
    message but the answer, with the generation prompt."""
    return record["prompt"] if is_raw(record) else chat_prompt(to_messages(record)[:-1],
                                                                 tokenizer)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer, records: list[dict], task_name: str | None,
                max_new_tokens: int = 32, batch_size: int = 16, desc: str = "evaluating"
                ) -> tuple[Accuracy, list[str]]:
    """(counts per family, the generated answers) of `records` under greedy decoding; text
    records (continued pre-training: no answer) are skipped."""
    records = [r for r in records if not is_text(r)]
    prompts = [question_prompt(r, tokenizer) for r in records]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                       progress=Ticker(desc, len(prompts), "answers").update)
    acc = Accuracy()
    for entry in (entries := scored_answers(records, answers, task_name)):
        acc.add(entry["family"], entry["correct"])
    acc.samples = sample_answers(entries)
    return acc, answers


def scored_answers(records: list[dict], answers: list[str], task_name: str | None
                   ) -> list[dict]:
    """One entry per record for a results file a reader can check: the question (every
    message but the answer), the expected answer, the model's answer, whether it counted as
    right, and its family."""
    out = []
    for record, answer in zip(records, answers, strict=True):
        messages = to_messages(record)
        out.append({"question": "\n".join(m["content"] for m in messages[:-1]),
                    "expected": messages[-1]["content"], "answer": answer,
                    "correct": score_answer(task_name, answer, record),
                    "family": family_of(task_name, record) or record_task(record)})
    return out


def record_task(record: dict) -> str:
    """The family of a record without a built-in scorer: its BIG-bench task (records with
    `targets`, fedlora.data.bigbench), else OTHER."""
    return str(record.get("task") or OTHER) if "targets" in record else OTHER


def names_scorer(task_name: str | None, record: dict) -> bool:
    """Whether a record names how its answer is scored: a built-in family (by `task_name`
    or its `task`), BIG-bench `targets`, or a `scorer` field."""
    return (family_of(task_name, record) is not None or isinstance(record.get("targets"), list)
            or bool(record.get("scorer")))


def scored_records(records: list[dict], task_name: str | None, mode: str, limit: int
                   ) -> list[dict]:
    """The first `limit` (0: none) of `records` answered for exact match: with
    exact-match=auto those that name their scorer (`names_scorer`), with all every one."""
    if mode not in EXACT_MATCH:
        raise ValueError(f"exact-match: expected one of {', '.join(EXACT_MATCH)}, got {mode!r}")
    if limit <= 0:
        return []
    chosen = records if mode == "all" else [r for r in records if names_scorer(task_name, r)]
    return chosen[:limit]


SAMPLES_PER_FAMILY = 3  # answers kept per family for the report (base against federated)
SAMPLE_CHARS = 400  # of each question, expected answer and answer kept


def first_per_family(entries: list[dict], per_family: int = SAMPLES_PER_FAMILY
                     ) -> list[dict]:
    """The first `per_family` entries of each family (their `family`), in their order."""
    kept: list[dict] = []
    count: dict[str, int] = {}
    for entry in entries:
        family = str(entry["family"])
        if count.get(family, 0) < per_family:
            count[family] = count.get(family, 0) + 1
            kept.append(entry)
    return kept


def sample_answers(entries: list[dict], per_family: int = SAMPLES_PER_FAMILY) -> list[dict]:
    """The first `per_family` of `scored_answers` entries of each family, in their order,
    each text cut to SAMPLE_CHARS: {family, question, expected, answer, correct}."""
    return [{"family": str(e["family"]), **{k: str(e[k])[:SAMPLE_CHARS]
                                            for k in ("question", "expected", "answer")},
             "correct": bool(e["correct"])} for e in first_per_family(entries, per_family)]


def samples_columns(samples: list[dict]) -> dict[str, Any]:
    """`sample_answers` as columns, one list per field (what a Flower ConfigRecord holds)."""
    columns: dict[str, list] = {f: [str(s[f]) for s in samples] for f in SAMPLE_FIELDS}
    columns["correct"] = [bool(s["correct"]) for s in samples]
    return columns


def samples_of(columns, partition_id: int, per_family: int = SAMPLES_PER_FAMILY) -> list[dict]:
    """The inverse of `samples_columns` for what a node sent, tagged with its partition id:
    only when every column is a list of the same length of strings (correct: booleans),
    at most `per_family` per family and each text cut to SAMPLE_CHARS; else []."""
    lists = [columns.get(f) for f in (*SAMPLE_FIELDS, "correct")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
        return []
    *texts, correct = lists
    if not all(isinstance(x, str) for v in texts for x in v) or \
            not all(isinstance(x, bool) for x in correct):
        return []
    entries = [{**dict(zip(SAMPLE_FIELDS, row[:-1])), "correct": row[-1]}
               for row in zip(*texts, correct)]
    return [{**s, "partition-id": partition_id} for s in sample_answers(entries, per_family)]
