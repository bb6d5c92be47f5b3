"""Turn records into token ids with labels on the response tokens only, and batch them."""

from __future__ import annotations

import torch

IGNORE = -100  # label value that the loss skips
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def to_messages(record: dict) -> list[dict]:
    """A record as chat messages; the last one is the assistant's answer."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
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


def tokenize(record: dict, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (prompt tokens masked with -100), cut to max_length."""
    prompt, response = prompt_and_response(to_messages(record), tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


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
