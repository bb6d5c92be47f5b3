"""Preference optimisation: DPO and IPO losses against hand computations, the per-sequence
log-probabilities against the model's own logits, and a policy that learns a preference."""

import math

import pytest
import torch

from fedlora.adapters import get_lora_state, set_lora_state
from fedlora.data import collate, tokenize
from fedlora.train.loop import trainable_parameters
from fedlora.train.preference import (
    PairScores,
    preference_figures,
    preference_loss,
    sequence_logprobs,
)


def scores(pc, pr, rc, rr, nc=(1,), nr=(1,)) -> PairScores:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    return PairScores(t(pc), t(pr), t(rc), t(rr), t(nc), t(nr))


def test_sigmoid_loss_equals_the_hand_computation():
    # h = (-3 - -4) - (-5 - -4.5) = 1.5; loss = -log sigmoid(0.1 * 1.5) = log(1 + e^-0.15)
    s = scores([-3.0], [-5.0], [-4.0], [-4.5])
    assert preference_loss(s, beta=0.1).item() == pytest.approx(math.log1p(math.exp(-0.15)),
                                                                 rel=1e-12)
    # two pairs: the mean of the two losses
    s2 = scores([-3.0, -2.0], [-5.0, -1.0], [-4.0, -2.0], [-4.5, -2.0])
    h2 = (0.0) - (1.0)  # second pair: the rejected response gained, the chosen did not
    expected = (math.log1p(math.exp(-0.15)) + math.log1p(math.exp(-0.5 * h2 / 5))) / 2
    assert preference_loss(s2, beta=0.1).item() == pytest.approx(expected, rel=1e-12)


def test_ipo_loss_uses_per_token_log_ratios():
    # chosen 4 tokens, rejected 2: h' = (1 / 4) - (-0.5 / 2) = 0.5; loss = (0.5 - 1/(2*0.5))^2
    s = scores([-3.0], [-5.0], [-4.0], [-4.5], nc=[4], nr=[2])
    assert preference_loss(s, beta=0.5, loss="ipo").item() == pytest.approx(0.25, rel=1e-12)


def test_a_policy_equal_to_its_reference_has_loss_log2_and_no_margin():
    s = scores([-3.0, -7.0], [-5.0, -2.0], [-3.0, -7.0], [-5.0, -2.0])
    assert preference_loss(s, beta=0.3).item() == pytest.approx(math.log(2), rel=1e-12)
    figures = preference_figures(s, beta=0.3)
    assert (figures.accuracy, figures.margin) == (0.0, 0.0)


def test_accuracy_margin_and_log_probabilities_against_hand_numbers():
    # rewards (beta 0.5): pair 1 chosen 0.5, rejected -0.25 (right); pair 2 chosen -1, rejected
    # 0 (wrong); pair 3 chosen 1, rejected 0.5 (right)
    s = scores([-3.0, -6.0, -1.0], [-5.0, -2.0, -4.0], [-4.0, -4.0, -3.0],
               [-4.5, -2.0, -5.0])
    figures = preference_figures(s, beta=0.5)
    assert figures.accuracy == pytest.approx(2 / 3)
    assert figures.margin == pytest.approx(((0.5 + 0.25) + (-1 - 0) + (1 - 0.5)) / 3)
    assert figures.chosen_logp == pytest.approx(-10 / 3)
    assert figures.rejected_logp == pytest.approx(-11 / 3)


def test_bad_beta_and_loss_names_are_refused():
    s = scores([-1.0], [-2.0], [-1.0], [-2.0])
    with pytest.raises(ValueError, match="dpo-beta: expected a number > 0, got 0"):
        preference_loss(s, beta=0.0)
    with pytest.raises(ValueError, match="dpo-loss: expected one of sigmoid, ipo, got 'hinge'"):
        preference_loss(s, beta=0.1, loss="hinge")


def pair_batch(slot, prompt, chosen, rejected):
    """One pair as a batch of two rows: [chosen, rejected] (raw prompt/completion text)."""
    rows = [tokenize({"prompt": prompt, "completion": c}, slot.tokenizer, 64)
            for c in (chosen, rejected)]
    return collate(rows, slot.tokenizer.pad_token_id)


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_sequence_logprobs_and_gradients_equal_the_models_own_logits(tiny_slot, chunk):
    torch.manual_seed(0)
    set_lora_state(tiny_slot.model, {k: torch.randn_like(v) * 0.05 for k, v in
                                     get_lora_state(tiny_slot.model, tiny_slot.adapter).items()},
                   tiny_slot.adapter)
    params = trainable_parameters(tiny_slot.model, tiny_slot.adapter)
    batch = pair_batch(tiny_slot, "Q: 2 + 3 =", " 5", " 7 and a longer wrong answer")
    tiny_slot.model.eval()
    logits = tiny_slot.model(**batch).logits[:, :-1].float().log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (picked * keep).sum(dim=1)
    want = torch.autograd.grad(expected.sum() + expected[0], params)
    got_sums, counts = sequence_logprobs(tiny_slot.model, batch, chunk_tokens=chunk)
    got = torch.autograd.grad(got_sums.sum() + got_sums[0], params)
    assert counts.tolist() == keep.sum(dim=1).tolist()
    assert counts[1] > counts[0]  # the rejected answer is longer: rows are kept apart
    torch.testing.assert_close(got_sums, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, want):  # float32 sums in another order: close to each tensor's scale
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


def tokenized_pair(slot, prompt, chosen, rejected) -> dict:
    """A pair as the training code holds it (raw prompt/completion text)."""
    c, r = (tokenize({"prompt": prompt, "completion": x}, slot.tokenizer, 64)
            for x in (chosen, rejected))
    return {**c, "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]}


PAIRS = [("Q: the capital of France is", " Paris", " Berlin"),
         ("Q: 2 + 2 =", " 4", " 5 or so")]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_training_on_pairs_ranks_them_right_and_leaves_the_reference_unchanged(tiny_slot, loss):
    from fedlora.train.preference import evaluate_pairs, pair_scores, score_reference

    pad = tiny_slot.tokenizer.pad_token_id
    pairs = [tokenized_pair(tiny_slot, *p) for p in PAIRS]
    before = evaluate_pairs(tiny_slot.model, pairs, pad, beta=0.5)
    assert (before.accuracy, before.margin) == (0.0, 0.0)  # B = 0: the policy is the base
    scored = score_reference(tiny_slot.model, pairs, pad)
    kept = [(p["ref_chosen"], p["ref_rejected"]) for p in scored]
    batch = pair_batch(tiny_slot, *PAIRS[0])
    with torch.no_grad():
        direct, _ = sequence_logprobs(tiny_slot.model, batch)
    assert kept[0] == pytest.approx((float(direct[0]), float(direct[1])), abs=1e-5)
    params = trainable_parameters(tiny_slot.model, tiny_slot.adapter)
    optimiser = torch.optim.AdamW(params, lr=5e-3)
    for _ in range(15):
        optimiser.zero_grad()
        preference_loss(pair_scores(tiny_slot.model, scored, pad), beta=0.5, loss=loss).backward()
        optimiser.step()
    after = evaluate_pairs(tiny_slot.model, pairs, pad, beta=0.5)
    assert [(p["ref_chosen"], p["ref_rejected"]) for p in scored] == kept
    assert after.accuracy == 1.0 and after.margin > 0.5
    assert after.chosen_logp > before.chosen_logp
