"""Preference records for `objective=dpo`: one prompt with a chosen and a rejected response.

The forms are TRL's preference datasets':

    prompt / chosen / rejected as text         raw text: the prompt and each response joined as
                                               they are, EOS after the response (as
                                               prompt/completion records are trained)
    prompt as messages, chosen / rejected as   chat: the tokenizer's chat template renders the
    assistant messages                         prompt and each response
    chosen / rejected as whole conversations   implicit prompt: the turns they share are the
    (no prompt, or a text prompt)              prompt, the rest of each is its response
    chosen / rejected as text (no prompt)      implicit prompt: the text they begin with, to a
                                               word boundary (HH-RLHF)

in every file format fedlora reads (`fedlora.data.loaders` reads a record with `chosen` and
`rejected` as a pair), with `field-map` renaming fields
(`field-map="prompt=question,chosen=good,rejected=bad"`). A BIG-bench multiple-choice task
becomes pairs too (`bigbench_pairs`): the right choice is chosen, a wrong one (seeded) rejected.
Only the response tokens are scored; the two responses share the prompt's tokens, cut from the
left (truncation=left) so that the longer response fits.
"""

from __future__ import annotations

import random

from fedlora.data.format import IGNORE, as_text, fit, prompt_and_response, tokenize_records

PAIR_FIELDS = ("prompt (text or messages), chosen and rejected (text, or assistant messages), "
               "or chosen and rejected as whole conversations sharing their first turns, or "
               "as texts beginning with the same prompt")


def _messages(value: object, where: str, field: str) -> list[dict]:
    """A list of {role, content} messages (not required to end with the assistant)."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        raise ValueError(f"{where}: {field!r} must be text or a non-empty list of {{role, "
                         f"content}} messages, got {str(value)[:60]}")
    return [{"role": str(m["role"]), "content": as_text(m["content"], "content", where)}
            for m in value]


def shared_text(chosen: str, rejected: str) -> int:
    """Where an implicit text prompt ends: after the characters both responses begin with,
    cut back to a word boundary so that each response starts at a whole word, the one space
    before it included (" Paris"), as TRL's `extract_prompt` keeps it; a shared beginning
    without whitespace is cut where the responses differ. 0: they share nothing."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    if cut == 0:
        return n
    return cut - 1 if chosen[cut - 1] == " " and cut > 1 else cut


def to_pair(rec: dict, where: str) -> dict:
    """A record (renamed by field-map) with `chosen` and `rejected`, checked as a preference
    pair: {prompt, chosen, rejected} as text, or as message lists (`chat`: True).

    Without a prompt, what the two responses share is the prompt: their first turns (chat) or
    the text they begin with (text, as Anthropic's HH-RLHF: "\n\nHuman: ...\n\nAssistant:").
    A text prompt with whole conversations as responses (HuggingFaceH4's
    ultrafeedback_binarized: the user turn is in both) takes the turns they share as the
    prompt; with assistant messages only, the text is the user's message."""
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
    chosen, rejected = rec["chosen"], rec["rejected"]
    prompt_value = rec.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt_value is None:  # implicit prompt: the text both responses begin with
            cut = shared_text(chosen, rejected)
            if cut == 0:
                raise ValueError(f"{where}: text responses need a text 'prompt' field, or "
                                 f"chosen and rejected that begin with the same prompt text "
                                 f"(these share nothing: {chosen[:30]!r} / {rejected[:30]!r})")
            prompt_value, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if not isinstance(prompt_value, str):
            raise ValueError(f"{where}: text responses need a text 'prompt' field, got "
                             f"{str(prompt_value)[:60]}")
        pair = {**rest, "prompt": prompt_value, "chosen": chosen, "rejected": rejected,
                "chat": False}
    else:
        good, bad = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        shared = 0  # the turns both conversations begin with
        while shared < min(len(good), len(bad)) - 1 and good[shared] == bad[shared]:
            shared += 1
        if prompt_value is None or (isinstance(prompt_value, str) and shared):
            prompt, good, bad = good[:shared], good[shared:], bad[shared:]
        elif isinstance(prompt_value, str):  # responses only: the text is the user's turn
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = _messages(prompt_value, where, "prompt")
        for field, turns in (("chosen", good), ("rejected", bad)):
            if turns[-1]["role"] != "assistant":
                raise ValueError(f"{where}: {field!r} must end with an assistant message, "
                                 f"got one from {turns[-1]['role']!r}")
        pair = {**rest, "prompt": prompt, "chosen": good, "rejected": bad, "chat": True}
    if pair["chosen"] == pair["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response; a pair "
                         f"must prefer one answer over another")
    return pair


def is_pair(record: dict) -> bool:
    """Is this record a preference pair (loaded by `to_pair`)?"""
    return "chosen" in record and "rejected" in record


def as_pairs(records: list[dict], seed: int, source: str) -> list[dict]:
    """objective=dpo's records: preference pairs as they are, BIG-bench multiple-choice
    examples made into pairs (`bigbench_pairs`); any other record is refused."""
    other = next((r for r in records if not is_pair(r) and "choices" not in r), None)
    if other is not None:
        raise ValueError(f"{source}: objective=dpo trains on preference records with "
                         f"{PAIR_FIELDS} (or BIG-bench multiple-choice tasks); a record has "
                         f"the fields {sorted(map(str, other))}; set objective=sft for it, or "
                         f"rename fields with field-map")
    return bigbench_pairs(records, seed, source)


def refuse_pairs(records: list[dict], source: str) -> None:
    """objective=sft: a preference pair has no one answer to learn; say so."""
    if any(is_pair(r) for r in records):
        raise ValueError(f"{source} holds preference records (chosen, rejected): train them "
                         f"with objective=dpo, or give sft records one answer each")


def bigbench_pairs(records: list[dict], seed: int, source: str = "bigbench") -> list[dict]:
    """BIG-bench multiple-choice records as pairs: the prompt (with its listed choices), the
    right choice as chosen, one wrong choice drawn with `seed` as rejected (task kept); a
    record that is a pair already stays as it is, one whose every choice is right is left
    out."""
    rng = random.Random(seed)
    pairs = []
    for i, rec in enumerate(records):
        if is_pair(rec):
            pairs.append(rec)
            continue
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


def for_objective(records: list[dict], objective: str, seed: int, source: str) -> list[dict]:
    """`records` as `objective` trains on them: pairs for dpo (`as_pairs`); for sft the
    records as they are, preference pairs refused."""
    if objective == "dpo":
        return as_pairs(records, seed, source)
    refuse_pairs(records, source)
    return records


def tokenize_for(records: list[dict], tokenizer, objective: str, max_length: int,
                 truncation: str = "left", train_on: str = "all-assistant") -> list[dict]:
    """`for_objective`'s records tokenized: pairs by `tokenize_pair`, others as sft trains."""
    if objective == "dpo":
        return [tokenize_pair(r, tokenizer, max_length, truncation) for r in records]
    return tokenize_records(records, tokenizer, max_length, truncation=truncation,
                            train_on=train_on)
