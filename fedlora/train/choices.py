"""Multiple-choice accuracy as BIG-bench scores it: the choice the model finds most likely.

A choice's score is the sum of the log-probabilities of its tokens given the prompt (BIG-bench's
`cond_log_prob`, no length normalisation). The prompt is the record's question formatted
exactly as training and `fedlora.train.accuracy.exact_match` format it (the chat template with
the generation prompt, or the plain template), and a choice is tokenized on its own, as
training tokenizes an answer after its prompt. As in BIG-bench, only the choice's own tokens
count, not an end-of-turn token after them: a choice that is a prefix of another (`5`, `50`)
is at least as likely as the longer one.

Records are those of `fedlora.data.bigbench` (`choices`, `target_scores`); a choice is right
when its score is the highest of the record's `target_scores` (ties: any of them).
"""

from __future__ import annotations

import inspect

import torch

from fedlora.adapters.virtual_tokens import causal_logits
from fedlora.data import to_messages
from fedlora.inference import chat_prompt
from fedlora.train.accuracy import OTHER, Accuracy

Row = tuple[list[int], list[int]]  # (prompt token ids, choice token ids)


@torch.no_grad()
def choice_logliks(model: torch.nn.Module, tokenizer, prompt: str, choices: list[str],
                   batch_size: int = 16) -> list[float]:
    """log P(choice | prompt) of each choice: the sum of its tokens' log-probabilities.

    `prompt` is a complete model input (e.g. `fedlora.inference.chat_prompt(...)`); prompt
    and choices are tokenized without added special tokens, as training does. The choices are
    scored `batch_size` at a time (right-padded, masked), without gradients.
    """
    prompt_ids = token_ids(tokenizer, prompt)
    return row_logliks(model, [(prompt_ids, token_ids(tokenizer, c)) for c in choices],
                       pad_id(tokenizer), batch_size)


def best_choice(logliks: list[float]) -> int:
    """The index of the most likely choice (the first of equal ones)."""
    if not logliks:
        raise ValueError("best_choice: no choices to pick from")
    return max(range(len(logliks)), key=lambda i: (logliks[i], -i))


@torch.no_grad()
def multiple_choice(model: torch.nn.Module, tokenizer, records: list[dict],
                    batch_size: int = 16) -> Accuracy:
    """Counts per task (a record's `task`) of records whose most likely choice is a target
    (kind "choice": choice-accuracy, choice-correct/<task>, ...).

    Records without `choices` (generative examples) are skipped; all choices of all records
    are scored `batch_size` sequences at a time.
    """
    scored = [r for r in records if r.get("choices")]
    rows: list[Row] = []
    for record in scored:
        prompt_ids = token_ids(tokenizer, chat_prompt(to_messages(record)[:-1], tokenizer))
        rows += [(prompt_ids, token_ids(tokenizer, c)) for c in record["choices"]]
    logliks = row_logliks(model, rows, pad_id(tokenizer), batch_size)
    acc, start = Accuracy(kind="choice"), 0
    for record in scored:
        choices = record["choices"]
        pick = choices[best_choice(logliks[start:start + len(choices)])]
        start += len(choices)
        acc.add(str(record.get("task") or OTHER), pick in targets_of(record))
    return acc


def targets_of(record: dict) -> list[str]:
    """The right choices: the highest-scored of `target_scores`, else `targets`."""
    scores = record.get("target_scores")
    if scores:
        best = max(scores.values())
        return [choice for choice, score in scores.items() if score == best]
    return list(record.get("targets") or [record["output"]])


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer) -> int:
    """Any id serves for padding (it is masked and never scored): pad, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (then only needed logits are made)."""
    unwrap = getattr(model, "get_base_model", None)  # a PEFT model passes it to its base
    base = unwrap() if callable(unwrap) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def row_logliks(model: torch.nn.Module, rows: list[Row], pad: int,
                batch_size: int) -> list[float]:
    """Sum of log P(choice tokens | prompt tokens) of each (prompt, choice) row."""
    if any(not prompt for prompt, _ in rows):
        raise ValueError("choice_logliks: the prompt has no tokens to condition on")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
    device = next(model.parameters()).device
    keep = keeps_logits(model)
    training = model.training
    model.eval()
    # one-token choices of the same prompt (MMLU's option letters) need one forward pass of
    # the prompt together: its last position's distribution scores them all
    single: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, choice) in enumerate(rows):
        if len(choice) == 1:
            single.setdefault(tuple(prompt), []).append(i)
    longer = [i for i, (_, choice) in enumerate(rows) if len(choice) != 1]
    out = [0.0] * len(rows)
    try:
        prompts = list(single)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            for key, logprobs in zip(batch, next_logprobs(model, batch, pad, device, keep),
                                        strict=True):
                for i in single[key]:
                    out[i] = float(logprobs[rows[i][1][0]])
        for start in range(0, len(longer), batch_size):
            batch_rows = [rows[i] for i in longer[start:start + batch_size]]
            for i, value in zip(longer[start:start + batch_size],
                                batch_logliks(model, batch_rows, pad, device, keep), strict=True):
                out[i] = value
    finally:
        model.train(training)
    return out


def next_logprobs(model: torch.nn.Module, prompts: list[tuple[int, ...]], pad: int,
                  device: torch.device, keep: bool) -> torch.Tensor:
    """log P(next token | prompt) over the vocabulary, one row per prompt (right-padded, so
    positions are those of an unpadded prompt; only each prompt's last logits are made)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        mask[r, :len(prompt)] = 1
    last = torch.tensor([[len(p) - 1] for p in prompts], device=device)
    ids, mask = ids.to(device), mask.to(device)
    if keep:
        logits = causal_logits(model, ids, mask, logits_to_keep=last)[:, 0]
    else:
        logits = causal_logits(model, ids, mask)
        logits = logits.gather(1, last.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))[:, 0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def batch_logliks(model: torch.nn.Module, rows: list[Row], pad: int, device: torch.device,
                  keep: bool) -> list[float]:
    """One right-padded forward pass over prompt + choice rows."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)  # the choice tokens
    for r, (prompt, choice) in enumerate(rows):
        n = len(prompt) + len(choice)
        ids[r, :n] = torch.tensor(prompt + choice, dtype=torch.long)
        mask[r, :n] = 1
        scored[r, len(prompt):n] = True
    # position t's logits predict token t + 1: only positions from the shortest prompt's last
    # token on are needed
    first = min(len(p) for p, _ in rows) - 1
    ids, mask = ids.to(device), mask.to(device)
    if keep:
        logits = causal_logits(model, ids, mask, logits_to_keep=width - first)
    else:
        logits = causal_logits(model, ids, mask)[:, first:]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = logprobs.gather(-1, ids[:, first + 1:].unsqueeze(-1)).squeeze(-1)
    token_lp = torch.where(scored[:, first + 1:].to(device), token_lp, 0.0)
    return token_lp.sum(dim=1).tolist()
