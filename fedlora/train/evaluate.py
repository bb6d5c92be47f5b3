"""Held-out loss and perplexity on response tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlora.data import collate
from fedlora.train.loss import response_loss
from fedlora.train.progress import Ticker


@dataclass
class EvalResult:
    """Token-weighted mean loss over response tokens, and its perplexity."""

    loss: float
    perplexity: float
    tokens: int
    examples: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[dict], pad_id: int,
             batch_size: int = 8, desc: str = "evaluating") -> EvalResult:
    """Mean next-token loss over every response token of `examples` (a progress line
    '<desc>: 8/32 examples, 12 s' at most every 10 s)."""
    if not examples:
        raise ValueError("no evaluation examples")
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    ticker = Ticker(desc, len(examples), "examples")
    for i in range(0, len(examples), batch_size):
        ticker.update(i)
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        loss, tokens = response_loss(model, batch)  # response tokens, LM head in chunks
        total += loss.item() * tokens
        count += tokens
    mean = total / max(count, 1)
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 50.0)), tokens=count,
                      examples=len(examples))
