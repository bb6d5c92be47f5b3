"""Next-token loss over the response tokens only, without the whole batch's vocabulary logits.

A causal LM's forward computes logits for every position of the batch over the whole
vocabulary (49k for SmolLM2, 32k-152k for 7B models), and Hugging Face's loss upcasts them to
fp32: for a batch of 4 x 256 tokens that is 4 x 256 x 49k x 4 bytes = 200 MB, plus its
gradient, usually the largest tensor of a LoRA step, and most of it is for prompt tokens the
loss ignores. `response_loss` runs the decoder once, then the LM head and the cross-entropy
only on the positions whose next token is labelled (labels != -100), CHUNK_TOKENS positions
at a time; each chunk is recomputed in the backward pass (activation checkpointing) instead of
being kept, so at most one chunk's logits exist at once. The result equals the model's own
`loss` (mean over labelled tokens, fp32 cross-entropy) to float rounding, and so do the
gradients (`tests/test_train.py`).

Models whose head does more than a linear map (final logit soft-capping, a logit scale) or
that do not expose decoder and head the usual way go through the model's own loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fedlora.adapters.virtual_tokens import prompted, virtual_kind
from fedlora.data import IGNORE
from fedlora.data.format import unpacked

CHUNK_TOKENS = 512  # positions per LM-head chunk: 512 x 49k x 4 bytes = 100 MB of fp32 logits
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) of a (PEFT-wrapped) causal LM whose logits are head(decoder(x)),
    or None when its head does more or they cannot be found."""
    unwrap = getattr(model, "get_base_model", None)  # a PeftModel: the model with LoRA in it
    base = unwrap() if callable(unwrap) else model
    get_head = getattr(base, "get_output_embeddings", None)
    get_decoder = getattr(base, "get_decoder", None)
    if get_head is None or get_decoder is None:
        return None
    head, decoder = get_head(), get_decoder()
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in HEAD_EXTRAS):
        return None
    if head is None or decoder is None or decoder is base:
        return None
    return decoder, head


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                ) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk of positions (on the head's device: a model
    split across devices may keep its head apart from the last layer)."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets.to(logits.device), reduction="sum")


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over the labelled tokens of `batch`, how many there were).
    A packed batch (`position_ids`) keeps its examples apart: by the restarting positions,
    or, for a model with virtual tokens (which go in front of every example), by giving each
    example a row of its own."""
    if "position_ids" in batch and virtual_kind(model):
        batch = unpacked(batch)
    labels = batch["labels"]
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE
    count = int(keep.sum())
    parts = decoder_and_head(model)
    if parts is None:
        if "position_ids" in batch:  # no padding mask: the restarts keep examples apart
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return model(**batch).loss, count
    decoder, head = parts
    hidden, keep, chosen, wanted = labelled_hidden(model, decoder, batch, targets, keep)
    if count == 0:  # as the model's own loss: nothing to learn from (0, with a graph)
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for _, part in head_chunks(_chunk_loss, head, chosen, wanted, chunk_tokens):
        total = total + part.to(total.device)
    return total / count, count


def labelled_hidden(model: torch.nn.Module, decoder: torch.nn.Module,
                    batch: dict[str, torch.Tensor], targets: torch.Tensor, keep: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder pass over `batch`: (its hidden states, `keep` on their device, the hidden
    states of the positions `keep` marks (those whose next token is labelled), their target
    tokens). Virtual tokens (a soft prompt, or prefixes as a cache) go first; their positions
    are dropped again."""
    inputs, skip = prompted(model, batch["input_ids"], batch["attention_mask"],
                            batch.get("position_ids"))
    hidden = decoder(**inputs).last_hidden_state[:, skip:]
    keep, targets = keep.to(hidden.device), targets.to(hidden.device)  # a split model's
    return hidden, keep, hidden[:, :-1][keep], targets[keep]


def head_chunks(fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                head: torch.nn.Module, chosen: torch.Tensor, wanted: torch.Tensor,
                chunk_tokens: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, fn(head, hidden, targets)) of each `chunk_tokens` positions in turn; with
    gradients on, a chunk is recomputed in the backward pass (activation checkpointing), so
    at most one chunk's logits exist at once."""
    grad = torch.is_grad_enabled()
    for start in range(0, wanted.shape[0], chunk_tokens):
        h, y = chosen[start:start + chunk_tokens], wanted[start:start + chunk_tokens]
        yield start, (checkpoint(fn, head, h, y, use_reentrant=False) if grad
                      else fn(head, h, y))
