"""Preference records for `objective=dpo`: one prompt with a chosen and a rejected response.

The forms are TRL's preference datasets':

    prompt / chosen / rejected as text         raw text: the prompt and each response joined as
                                               they are, EOS after the response (as
                                               prompt/completion records are trained)
    prompt as messages, chosen / rejected as   chat: the tokenizer's chat template renders the
    assistant messages                         prompt and each response
    chosen / rejected as whole conversations   implicit prompt: the turns they share are the
    (no prompt)                                prompt, the rest of each is its response

in every file format fedlora reads (`fedlora.data.loaders`), with `field-map` renaming fields
(`field-map="prompt=question,chosen=good,rejected=bad"`). A BIG-bench multiple-choice task
becomes pairs too (`bigbench_pairs`): the right choice is chosen, a wrong one (seeded) rejected.
Only the response tokens are scored; the two responses share the prompt's tokens, cut from the
left (truncation=left) so that the longer response fits.
"""

from __future__ import annotations

import random

from fedlora.data.format import IGNORE, as_text, fit, prompt_and_response
from fedlora.data.loaders import read_rows

PAIR_FIELDS = ("prompt (text or messages), chosen and rejected (text, or assistant messages), "
               "or chosen and rejected as whole conversations sharing their first turns")


def _messages(value: object, where: str, field: str) -> list[dict]:
    """A list of {role, content} messages (not required to end with the assistant)."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        raise ValueError(f"{where}: {field!r} must be text or a non-empty list of {{role, "
                         f"content}} messages, got {str(value)[:60]}")
    return [{"role": str(m["role"]), "content": as_text(m["content"], "content", where)}
            for m in value]


def to_pair(row: object, field_map: dict[str, str], where: str) -> dict:
    """A raw row renamed by `field_map` ({ours: yours}) and checked as a preference pair:
    {prompt, chosen, rejected} with text values, or with message lists (`chat`: True)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a record object, got {type(row).__name__}")
    rec = {**row, **{ours: row[yours] for ours, yours in field_map.items() if yours in row}}
    if "chosen" not in rec or "rejected" not in rec:
        mapped = f" after field-map {field_map}" if field_map else ""
        raise ValueError(f"{where}: a preference record needs {PAIR_FIELDS}; found fields "
                         f"{sorted(map(str, rec))}{mapped}; rename yours with field-map, e.g. "
                         f"field-map=\"prompt=question,chosen=good,rejected=bad\"")
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" not in rec or not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: text responses need a text 'prompt' field, got "
                             f"{str(rec.get('prompt'))[:60]}")
        pair = {**rest, "prompt": rec["prompt"], "chosen": chosen, "rejected": rejected,
                "chat": False}
    else:
        good, bad = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        if "prompt" in rec:
            prompt = _messages(rec["prompt"], where, "prompt")
        else:  # implicit prompt: the turns both conversations share
            shared = 0
            while shared < min(len(good), len(bad)) - 1 and good[shared] == bad[shared]:
                shared += 1
            prompt, good, bad = good[:shared], good[shared:], bad[shared:]
        for field, turns in (("chosen", good), ("rejected", bad)):
            if turns[-1]["role"] != "assistant":
                raise ValueError(f"{where}: {field!r} must end with an assistant message, "
                                 f"got one from {turns[-1]['role']!r}")
        pair = {**rest, "prompt": prompt, "chosen": good, "rejected": bad, "chat": True}
    if pair["chosen"] == pair["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response; a pair "
                         f"must prefer one answer over another")
    return pair


def load_pairs(source: str, field_map: dict[str, str] | None = None,
               split: str = "train", seed: int = 0) -> list[dict]:
    """Every preference pair of a file, folder or hf: id (or of a bigbench: multiple-choice
    task, made into pairs by `bigbench_pairs`)."""
    from fedlora.config import BIGBENCH_PREFIX

    if source.startswith(BIGBENCH_PREFIX):
        from fedlora.data.bigbench import load_bigbench

        return bigbench_pairs(load_bigbench(source[len(BIGBENCH_PREFIX):]), seed, source)
    pairs = [to_pair(row, field_map or {}, where) for where, row in read_rows(source, split)]
    if not pairs:
        raise ValueError(f"{source} holds no records; expected preference records with "
                         f"{PAIR_FIELDS}")
    return pairs


def bigbench_pairs(records: list[dict], seed: int, source: str = "bigbench") -> list[dict]:
    """BIG-bench multiple-choice records as pairs: the prompt (with its listed choices), the
    right choice as chosen, one wrong choice drawn with `seed` as rejected (task kept)."""
    rng = random.Random(seed)
    pairs = []
    for i, rec in enumerate(records):
        if "choices" not in rec:
            raise ValueError(f"{source}: example {i} of task {rec.get('task')!r} is generative "
                             f"(no target_scores); preference pairs need multiple-choice tasks")
        wrong = [c for c in rec["choices"] if c not in rec["targets"]]
        if not wrong:
            continue  # every choice is right: nothing to prefer
        pairs.append({"task": rec.get("task"), "prompt": [{"role": "user",
                                                           "content": rec["instruction"]}],
                      "chosen": [{"role": "assistant", "content": rec["output"]}],
                      "rejected": [{"role": "assistant", "content": rng.choice(wrong)}],
                      "chat": True})
    return pairs


def response_text(pair: dict, key: str, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of the pair's `key` response ("chosen" or "rejected")."""
    if pair["chat"]:
        return prompt_and_response(pair["prompt"] + pair[key], tokenizer)
    return pair["prompt"], pair[key] + (tokenizer.eos_token or "")


def tokenize_pair(pair: dict, tokenizer, max_length: int, truncation: str = "left"
                  ) -> dict[str, list[int]]:
    """input_ids / labels of prompt + chosen and rejected_input_ids / rejected_labels of
    prompt + rejected, prompt tokens IGNORE, each at most max_length long; the prompt is cut
    once, so that the longer response fits (truncation=left) or not at all ("right")."""
    texts = {key: response_text(pair, key, tokenizer) for key in ("chosen", "rejected")}
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    responses = {key: ids(response) for key, (_, response) in texts.items()}
    longest = max(responses.values(), key=len)
    out: dict[str, list[int]] = {}
    for key, prefix in (("chosen", ""), ("rejected", "rejected_")):
        prompt_ids = fit(ids(texts[key][0]), longest, max_length, truncation)
        out[prefix + "input_ids"] = (prompt_ids + responses[key])[:max_length]
        out[prefix + "labels"] = ([IGNORE] * len(prompt_ids) + responses[key])[:max_length]
    return out
