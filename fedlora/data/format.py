"""Turn records into token ids with labels on the response tokens only, pack and batch them.

Instruction and chat records use the tokenizer's chat template when it has one, a plain
`### Instruction` template otherwise; a multi-turn conversation trains on its last assistant
turn only (earlier turns are context). Text prompt/completion pairs are joined as they are, with
no template (as in TRL), and end with the EOS token.
"""

from __future__ import annotations

import torch

IGNORE = -100  # label value that the loss skips
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def as_text(value: object, field: str, where: str) -> str:
    """A text field's value (numbers become text; None, lists and objects are refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {field!r} must be text, got {value!r}")


def to_messages(record: dict) -> list[dict]:
    """A record as chat messages; the last one is the assistant's answer."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def prompt_and_response(messages: list[dict], tokenizer) -> tuple[str, str]:
    """Split a conversation into the text before the answer and the answer text itself."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not extend the prompt with the "
                             "answer; cannot mask the prompt out of the loss")
        return prompt, full[len(prompt):]
    history = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages[:-2])
    user = messages[-2]["content"] if len(messages) > 1 else ""
    prompt = history + PLAIN_PROMPT.format(instruction=user, input_block="")
    return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")


def is_raw(record: dict) -> bool:
    """Is this a raw prompt/completion pair (joined as it is, no chat template)?"""
    return "prompt" in record and "messages" not in record


def record_text(record: dict, tokenizer) -> tuple[str, str]:
    """(prompt, response) text of a record: a raw prompt/completion pair, or templated."""
    if is_raw(record):
        return record["prompt"], record["completion"] + (tokenizer.eos_token or "")
    return prompt_and_response(to_messages(record), tokenizer)


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int, truncation: str
        ) -> list[int]:
    """The prompt tokens kept so that prompt + answer fit in max_length: with "left", the
    prompt's start is cut first, keeping at least half of max_length of it (the rest of the
    example is then cut from the right); with "right", the prompt is kept whole."""
    if truncation == "right" or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids
    keep = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 2))
    return prompt_ids[len(prompt_ids) - keep:]


def tokenize(record: dict, tokenizer, max_length: int, truncation: str = "left"
             ) -> dict[str, list[int]]:
    """input_ids and labels (prompt tokens masked with -100), at most max_length long: the
    prompt's start is cut first ("left", so that the answer stays), or the end ("right")."""
    prompt, response = record_text(record, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    prompt_ids = fit(prompt_ids, response_ids, max_length, truncation)
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def answer_tokens(example: dict[str, list[int]]) -> int:
    """Tokens the loss learns from: labels that are not IGNORE, after the first position
    (the model shifts labels, so the first one is never predicted)."""
    return sum(label != IGNORE for label in example["labels"][1:])


LOST_WARNING = 0.1  # warn when more than this share of examples lost their whole answer


def check_answers(examples: list[dict[str, list[int]]], who: str, max_length: int,
                  truncation: str) -> str | None:
    """Raise a ValueError when no training example keeps an answer token (training would
    learn nothing); a warning when more than 10 % of them lost their whole answer; else None."""
    lost = sum(answer_tokens(e) == 0 for e in examples)
    if examples and lost == len(examples):
        raise ValueError(
            f"{who}: every one of its {len(examples)} training examples loses its whole answer "
            f"at max-length={max_length} (truncation={truncation}), so training would learn "
            f"nothing; raise max-length" + (" or set truncation=left" if truncation == "right"
                                            else ""))
    if lost > LOST_WARNING * len(examples):
        return (f"{who}: {lost} of {len(examples)} training examples lose their whole answer "
                f"at max-length={max_length} (truncation={truncation}) and teach nothing; "
                f"raise max-length")
    return None


def pack(examples: list[dict[str, list[int]]], max_length: int,
         eos_id: int) -> list[dict[str, list[int]]]:
    """Examples joined end to end (an EOS between them) and cut into max_length sequences.

    The separating EOS is not a target (an example's own end token already is), so a truncated
    example does not learn to stop; a sequence with nothing to predict is dropped.
    """
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e["input_ids"]
        labels += e["labels"]
        if not e["input_ids"] or e["input_ids"][-1] != eos_id:
            ids.append(eos_id)
            labels.append(IGNORE)
    chunks = [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
              for i in range(0, len(ids), max_length)]
    # the model shifts labels, so a sequence's first label is never predicted
    return [c for c in chunks if answer_tokens(c)]


def tokenize_records(records: list[dict], tokenizer, max_length: int,
                     packing: bool = False, truncation: str = "left"
                     ) -> list[dict[str, list[int]]]:
    """Every record tokenized (cut to max_length), then packed into max_length sequences."""
    examples = [tokenize(r, tokenizer, max_length, truncation) for r in records]
    return pack_with(tokenizer, examples, max_length) if packing else examples


def pack_with(tokenizer, examples: list[dict[str, list[int]]], max_length: int
              ) -> list[dict[str, list[int]]]:
    """`pack` with the tokenizer's EOS between examples (refused when it has none)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("setting 'packing': packing puts an EOS token between examples, but "
                         "the tokenizer has none; set packing=false")
    return pack(examples, max_length, tokenizer.eos_token_id)


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into (batch, longest) tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
