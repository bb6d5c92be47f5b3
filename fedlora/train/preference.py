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

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from fedlora.config import DPO_LOSSES, TrainSettings
from fedlora.data import IGNORE, collate
from fedlora.train.hooks import LocalTraining
from fedlora.train.loss import CHUNK_TOKENS, decoder_and_head, head_chunks, labelled_hidden


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
    hidden, keep, chosen, wanted = labelled_hidden(model, decoder, batch, targets, keep)
    rows = keep.nonzero()[:, 0]  # the row of every labelled position, in order
    sums = hidden.new_zeros(keep.shape[0], dtype=torch.float32)
    for start, part in head_chunks(_chunk_logprobs, head, chosen, wanted, chunk_tokens):
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
    return pair_losses(scores, beta, loss).mean()


def pair_losses(scores: PairScores, beta: float, loss: str = "sigmoid") -> torch.Tensor:
    """Each pair's loss, shape (pairs,): a pair's depends on its own scores only."""
    if beta <= 0:
        raise ValueError(f"dpo-beta: expected a number > 0, got {beta}")
    if loss == "sigmoid":
        h = ((scores.policy_chosen - scores.ref_chosen)
             - (scores.policy_rejected - scores.ref_rejected))
        return -F.logsigmoid(beta * h)
    if loss == "ipo":
        chosen_n = scores.chosen_tokens.clamp(min=1)
        rejected_n = scores.rejected_tokens.clamp(min=1)
        h = ((scores.policy_chosen - scores.ref_chosen) / chosen_n
             - (scores.policy_rejected - scores.ref_rejected) / rejected_n)
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"dpo-loss: expected one of {', '.join(DPO_LOSSES)}, got {loss!r}")


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


# ---- pairs of tokenized responses -----------------------------------------------------------
# A tokenized pair is a dict: input_ids / labels (prompt + chosen, prompt tokens IGNORE),
# rejected_input_ids / rejected_labels (prompt + rejected), and once scored by the reference
# ref_chosen / ref_rejected (summed log-probabilities, floats).

def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2N rows: the N chosen sequences, then the N rejected ones."""
    rows = ([{"input_ids": p["input_ids"], "labels": p["labels"]} for p in pairs]
            + [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]}
               for p in pairs])
    return collate(rows, pad_id)


@torch.no_grad()
def score_reference(model: torch.nn.Module, pairs: list[dict], pad_id: int,
                    batch_size: int = 8) -> list[dict]:
    """`pairs` with the reference's summed log-probabilities of each response: the model as it
    is now (a round's starting point: the global adapter the client received), computed once
    per pair, so that a training step costs one forward pass of the policy only."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        part = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
        sums, _ = sequence_logprobs(model, batch)
        n = len(part)
        out += [{**p, "ref_chosen": float(sums[j]), "ref_rejected": float(sums[n + j])}
                for j, p in enumerate(part)]
    return out


def pair_scores(model: torch.nn.Module, pairs: list[dict], pad_id: int) -> PairScores:
    """The policy's scores of a batch of reference-scored pairs (differentiable)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    sums, counts = sequence_logprobs(model, batch)
    n = len(pairs)
    ref = lambda key: torch.tensor([p[key] for p in pairs], dtype=sums.dtype, device=device)
    return PairScores(sums[:n], sums[n:], ref("ref_chosen"), ref("ref_rejected"),
                      counts[:n], counts[n:])


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: list[dict], pad_id: int, beta: float,
                   batch_size: int = 8) -> PreferenceFigures:
    """Held-out preference figures of the model's active adapter against the base model (the
    adapter disabled: a PEFT model's `disable_adapter`), pooled over `pairs`: at round 0 (no
    update yet) the margin is 0."""
    if not pairs:
        raise ValueError("no held-out preference pairs")
    disabled = getattr(model, "disable_adapter", None)  # PeftModel's context manager
    if disabled is None:
        raise TypeError("evaluate_pairs scores a PEFT model's adapter against its base")
    with disabled():
        scored = score_reference(model, pairs, pad_id, batch_size)
    model.eval()
    parts = [pair_scores(model, scored[i:i + batch_size], pad_id)
             for i in range(0, len(scored), batch_size)]
    joined = PairScores(*(torch.cat([getattr(p, f) for p in parts])
                          for f in PairScores.__dataclass_fields__))
    return preference_figures(joined, beta)


def dpo_batch_loss(beta: float, loss: str, pad_id: int):
    """The `LocalTraining.batch_loss` of objective=dpo: a micro-batch of reference-scored pairs
    -> (its mean preference loss, the pairs it is a mean over)."""
    def batch_loss(model: torch.nn.Module, pairs: list[dict]) -> tuple[torch.Tensor, int]:
        return preference_loss(pair_scores(model, pairs, pad_id), beta, loss), len(pairs)
    return batch_loss


def dpo_unit_losses(beta: float, loss: str, pad_id: int):
    """dp-sgd's unit of objective=dpo (`LocalTraining.unit_losses`): a micro-batch of
    reference-scored pairs -> (each pair's loss, 2 rows per pair: the chosen rows, then the
    rejected ones, as `collate_pairs` lays them out; tokens fed)."""
    def unit_losses(model: torch.nn.Module, pairs: list[dict]) -> tuple[torch.Tensor, int, int]:
        tokens = sum(len(p["input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
        return pair_losses(pair_scores(model, pairs, pad_id), beta, loss), 2, tokens
    return unit_losses


def with_reference(model: torch.nn.Module, pairs: list[dict], pad_id: int,
                   train: TrainSettings, seed: int) -> list[dict]:
    """`pairs` with the reference scores on every pair this round's steps will draw (the
    seeded order `fedlora.train.loop.batches` follows; with dp-sgd, whose Poisson sampling
    may draw any pair, every pair), scored once by the model as it is now: the adapter the
    round starts from."""
    from fedlora.train.loop import batches

    if train.dp_sgd:
        return score_reference(model, pairs, pad_id, train.batch_size)
    order = batches(list(range(len(pairs))), train.batch_size, seed)
    used = sorted({i for _ in range(train.local_steps * train.grad_accum) for i in next(order)})
    scored = score_reference(model, [pairs[i] for i in used], pad_id, train.batch_size)
    out = list(pairs)
    for i, pair in zip(used, scored):
        out[i] = pair
    return out


def dpo_training(model: torch.nn.Module, hooks: LocalTraining, pairs: list[dict], pad_id: int,
                 train: TrainSettings, seed: int) -> LocalTraining:
    """`hooks` for a round of objective=dpo: the pairs with their reference scores, and the
    preference loss in place of the next-token loss."""
    return replace(hooks, examples=with_reference(model, hooks.examples or pairs, pad_id, train,
                                                  seed),
                   batch_loss=dpo_batch_loss(train.dpo_beta, train.dpo_loss, pad_id), units=len,
                   unit_losses=dpo_unit_losses(train.dpo_beta, train.dpo_loss, pad_id))


def figures_metrics(figures: PreferenceFigures, pairs: int) -> dict[str, float | int]:
    """A node's evaluation metrics of `figures` over `pairs` held-out pairs (wire keys)."""
    from fedlora import wire

    return {wire.PREF_PAIRS: pairs, wire.PREF_ACCURACY: figures.accuracy,
            wire.PREF_MARGIN: figures.margin, wire.CHOSEN_LOGP: figures.chosen_logp,
            wire.REJECTED_LOGP: figures.rejected_logp}
