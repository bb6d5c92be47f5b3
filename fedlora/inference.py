"""Text generation with a base model or base + adapter: prompts formatted as in training.

`generate` is the one batched generation routine (left padding, new text only), shared by
`fedlora generate` and by evaluation code that scores generated answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from fedlora.adapters.virtual_tokens import generation_inputs, runner
from fedlora.data.format import prompt_and_response


def chat_prompt(messages: list[dict], tokenizer) -> str:
    """The text that asks the model for the next assistant turn after `messages`.

    Formatted exactly as training formats a prompt: the tokenizer's chat template with the
    generation prompt, or the plain `### Instruction` / `### Response` template.
    """
    return prompt_and_response([*messages, {"role": "assistant", "content": ""}], tokenizer)[0]


def user_prompt(text: str, tokenizer) -> str:
    """A single user message formatted as a training prompt."""
    return chat_prompt([{"role": "user", "content": text}], tokenizer)


@contextlib.contextmanager
def left_padding(tokenizer):
    """Pad on the left while inside: a batch's prompts then all end where generation starts."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, batch_size: int = 8,
             progress: Callable[[int], object] | None = None) -> list[str]:
    """The text each prompt continues with (prompt and special tokens removed).

    `prompts` are complete model inputs (see `user_prompt`); they are tokenized without
    added special tokens, as training does. temperature 0 is greedy decoding (deterministic),
    above 0 sampling. Generation stops at the tokenizer's EOS token or after max_new_tokens.
    `progress` is called with the number of prompts answered before each batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature}")
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    model.eval()
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        if progress is not None:
            progress(i)
        with left_padding(tokenizer):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
        # virtual tokens (a soft prompt, prefixes) go in front (fedlora.adapters.virtual_tokens)
        inputs, start = generation_inputs(model, batch["input_ids"], batch["attention_mask"])
        out = runner(model).generate(**inputs, generation_config=config)
        new = out[:, start:]  # left padding: every prompt ends at `start`
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts
