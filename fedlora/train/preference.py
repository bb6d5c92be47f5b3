"""Preference optimisation (DPO, Rafailov et al. 2023; IPO, Azar et al. 2023): the losses, the
per-sequence log-probabilities they read, and the figures a round reports.

A preference pair is one prompt with a `chosen` and a `rejected` response. The policy is the
model being trained, the reference a frozen model it is compared with. With the summed
log-probabilities of each response's tokens (prompt tokens are not scored),

    h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

    sigmoid (DPO):  loss = -log sigmoid(beta * h)
    ipo:            loss = (h' - 1 / (2 beta))^2,  h' as h with each log-probability divided by
                    its response's token count (IPO regresses the per-token log-ratio gap)

and the implicit rewards are beta * (log pi - log ref) of each response. A pair counts as
ranked right when the chosen response's reward is above the rejected one's; the margin is the
difference of the two rewards.

`sequence_logprobs` runs the decoder once and the LM head on the labelled positions only, a
chunk at a time (as `fedlora.train.loss.response_loss` does), so a step never holds the batch's
full-vocabulary logits.

The formulas follow TRL's `DPOTrainer` (its `sigmoid` and `ipo` loss types, reward and
accuracy definitions); TRL's trainer itself is not used: it is a whole training loop over one
model, and fedlora's round loop (an adapter received, trained, sent back) is its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fedlora.adapters.virtual_tokens import prompted
from fedlora.data import IGNORE
from fedlora.train.loss import CHUNK_TOKENS, decoder_and_head

LOSSES = ("sigmoid", "ipo")


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                    ) -> torch.Tensor:
    """fp32 log-probability of each target token of one chunk of positions."""
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets.to(logits.device), reduction="none")


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, how many there were), both of
    shape (batch,): position t scores token t+1, as the training loss does."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    counts = keep.sum(dim=1)
    parts = decoder_and_head(model)
    if parts is None:  # a head that does more than a linear map: the model's own logits
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        picked = torch.gather(logits.log_softmax(-1), 2,
                              targets.clamp(min=0).to(logits.device).unsqueeze(-1)).squeeze(-1)
        return (picked * keep.to(picked.device)).sum(dim=1), counts
    decoder, head = parts
    inputs, skip = prompted(model, batch["input_ids"], batch["attention_mask"])
    hidden = decoder(**inputs).last_hidden_state[:, skip:]
    keep, targets = keep.to(hidden.device), targets.to(hidden.device)
    rows = keep.nonzero()[:, 0]  # the row of every labelled position, in order
    chosen, wanted = hidden[:, :-1][keep], targets[keep]
    sums = hidden.new_zeros(keep.shape[0], dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for start in range(0, int(rows.numel()), chunk_tokens):
        h, y = chosen[start:start + chunk_tokens], wanted[start:start + chunk_tokens]
        part = (checkpoint(_chunk_logprobs, head, h, y, use_reentrant=False) if grad
                else _chunk_logprobs(head, h, y))
        sums = sums.index_add(0, rows[start:start + chunk_tokens].to(sums.device),
                              part.to(sums.device))
    return sums, counts.to(sums.device)


@dataclass(frozen=True)
class PairScores:
    """Summed response log-probabilities of a batch of pairs, (batch,) each, and the response
    token counts (IPO's per-token average)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class PreferenceFigures:
    """What a batch of pairs says about the policy (means over the pairs)."""

    accuracy: float  # share of pairs whose chosen reward is above the rejected one's
    margin: float  # chosen reward - rejected reward
    chosen_logp: float  # the policy's summed log-probability of the chosen responses
    rejected_logp: float


def preference_loss(scores: PairScores, beta: float, loss: str = "sigmoid") -> torch.Tensor:
    """The mean loss over the pairs (differentiable in the policy's log-probabilities)."""
    if beta <= 0:
        raise ValueError(f"dpo-beta: expected a number > 0, got {beta}")
    if loss == "sigmoid":
        h = ((scores.policy_chosen - scores.ref_chosen)
             - (scores.policy_rejected - scores.ref_rejected))
        return -F.logsigmoid(beta * h).mean()
    if loss == "ipo":
        chosen_n = scores.chosen_tokens.clamp(min=1)
        rejected_n = scores.rejected_tokens.clamp(min=1)
        h = ((scores.policy_chosen - scores.ref_chosen) / chosen_n
             - (scores.policy_rejected - scores.ref_rejected) / rejected_n)
        return ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    raise ValueError(f"dpo-loss: expected one of {', '.join(LOSSES)}, got {loss!r}")


def preference_figures(scores: PairScores, beta: float) -> PreferenceFigures:
    """Accuracy, margin and the policy's log-probabilities of a batch of pairs (no gradient)."""
    with torch.no_grad():
        chosen = beta * (scores.policy_chosen - scores.ref_chosen)
        rejected = beta * (scores.policy_rejected - scores.ref_rejected)
        return PreferenceFigures(
            accuracy=float((chosen > rejected).float().mean()),
            margin=float((chosen - rejected).mean()),
            chosen_logp=float(scores.policy_chosen.mean()),
            rejected_logp=float(scores.policy_rejected.mean()))
