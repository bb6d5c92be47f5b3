"""Local training: loss goes down, seeds reproduce, the schedule continues across rounds."""

import math

import pytest
import torch

from fedlora.adapters import Workspace, get_lora_state, set_lora_state
from fedlora.config import Settings
from fedlora.data import client_records, tokenize
from fedlora.train import LocalTraining, RoundPlan, evaluate, lr_factor, train_local


def setup(settings):
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    train, held = client_records(settings.data, 0, 1, seed=0)
    tok = lambda rs: [tokenize(r, slot.tokenizer, settings.train.max_length) for r in rs]
    return slot, tok(train), tok(held)


def test_training_lowers_held_out_loss_and_touches_only_lora(tiny_settings):
    s = Settings.from_config({**tiny_settings.to_config(), "local-steps": 30})
    slot, train, held = setup(s)
    frozen = {n: p.clone() for n, p in slot.model.named_parameters() if ".lora_" not in n}
    before = evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss
    result = train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id, s.train,
                         RoundPlan())
    after = evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss
    assert result.steps == 30 and result.tokens > 0
    assert after < before - 0.5
    assert result.last_loss < result.first_loss
    assert all(torch.equal(p, frozen[n]) for n, p in slot.model.named_parameters()
               if ".lora_" not in n)


def test_same_seed_same_factors(tiny_settings):
    results = []
    for _ in range(2):
        slot, train, _ = setup(tiny_settings)
        torch.manual_seed(0)
        start = {k: torch.randn_like(v) * 0.01 for k, v in
                 get_lora_state(slot.model, slot.adapter).items()}
        set_lora_state(slot.model, start, slot.adapter)
        train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id,
                    tiny_settings.train, RoundPlan(seed=42))
        results.append(get_lora_state(slot.model, slot.adapter))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_gradient_accumulation_feeds_more_tokens_per_step(tiny_settings):
    s = Settings.from_config({**tiny_settings.to_config(), "grad-accum": 3, "local-steps": 2})
    slot, train, _ = setup(s)
    one = Settings.from_config({**tiny_settings.to_config(), "local-steps": 2})
    r3 = train_local(slot.model, slot.adapter, train, 0, s.train, RoundPlan())
    r1 = train_local(slot.model, slot.adapter, train, 0, one.train, RoundPlan())
    assert r3.tokens > 2 * r1.tokens


def test_cosine_schedule_continues_across_rounds():
    total = 3 * 10
    round2_first = lr_factor(10, total, 0, "cosine")
    round1_last = lr_factor(9, total, 0, "cosine")
    assert lr_factor(0, total, 0, "cosine") == 1.0
    assert round1_last > round2_first > lr_factor(29, total, 0, "cosine") > 0
    assert math.isclose(lr_factor(15, total, 0, "cosine"), 0.5)
    assert lr_factor(0, total, 4, "linear") == 0.25  # warm-up
    assert lr_factor(17, total, 0, "constant") == 1.0


def test_paged_optimizer_is_refused_on_cpu(tiny_settings):
    s = Settings.from_config({**tiny_settings.to_config(), "optimizer": "paged-adamw-8bit"})
    slot, train, _ = setup(s)
    with pytest.raises(ValueError, match="paged-adamw-8bit' needs a CUDA device"):
        train_local(slot.model, slot.adapter, train, 0, s.train, RoundPlan())


def test_4bit_base_trains_on_cpu(tiny_settings):
    s = Settings.from_config({**tiny_settings.to_config(), "quantization": "4bit",
                              "local-steps": 20})
    slot, train, held = setup(s)
    before = evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss
    train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id, s.train, RoundPlan())
    assert evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss < before


def test_a_4bit_base_in_bf16_keeps_its_norms_bf16_and_trains_on_cpu(tiny_settings):
    """No fp32 upcast of a quantized base's norms in bf16 (Workspace.upcasts_norms): the
    norms stay bf16, the adapter float32, and the loss falls."""
    s = Settings.from_config({**tiny_settings.to_config(), "quantization": "4bit",
                              "compute-dtype": "bfloat16", "local-steps": 20})
    slot, train, held = setup(s)
    norms = [p for n, p in slot.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    assert all(p.dtype == torch.float32 for n, p in slot.model.named_parameters()
               if p.requires_grad)
    before = evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss
    train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id, s.train, RoundPlan())
    assert evaluate(slot.model, held, slot.tokenizer.pad_token_id).loss < before


def test_an_evaluated_4bit_base_still_passes_gradients_through_its_weights(tiny_settings):
    """bitsandbytes repacks a 4-bit weight for a CPU inference kernel without a backward on
    the first evaluation (on CPUs with AVX512-BF16): after it, training lost the gradient
    through every base weight. fedlora's loads keep the differentiable path (loader.py)."""
    from fedlora.data import collate
    from fedlora.train.loss import response_loss

    s = Settings.from_config({**tiny_settings.to_config(), "quantization": "4bit",
                              "compute-dtype": "bfloat16", "lora-dropout": 0.0})

    def first_layer_grads(evaluated: bool) -> torch.Tensor:
        torch.manual_seed(0)  # the same LoRA init in both loads
        slot, train, held = setup(s)
        if evaluated:
            evaluate(slot.model, held, slot.tokenizer.pad_token_id)
        slot.model.train()
        slot.model.zero_grad()
        response_loss(slot.model, collate(train[:2], slot.tokenizer.pad_token_id))[0].backward()
        return torch.cat([p.grad.flatten() for n, p in slot.model.named_parameters()
                          if ".layers.0." in n and ".lora_B." in n])

    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                           "packing_format_for_cpu", False) for m in setup(s)[0].model.modules())
    fresh, evaluated = first_layer_grads(False), first_layer_grads(True)
    assert fresh.abs().sum() > 0 and torch.allclose(evaluated, fresh, rtol=1e-3, atol=1e-6)


def test_evaluate_counts_only_response_tokens(tiny_slot):
    ex = {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]}
    result = evaluate(tiny_slot.model, [ex], pad_id=0)
    assert result.tokens == 2 and math.isclose(result.perplexity, math.exp(result.loss))


def test_proximal_term_keeps_the_adapter_near_its_start(tiny_settings):
    """FedProx: a large mu pulls the LoRA parameters back towards where the round started."""
    moved = {}
    for mu in (0.0, 100.0):
        slot, train, _ = setup(tiny_settings)
        torch.manual_seed(0)
        start = {k: v.clone() for k, v in get_lora_state(slot.model, slot.adapter).items()}
        train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id,
                    tiny_settings.train, RoundPlan(), LocalTraining(proximal_mu=mu))
        end = get_lora_state(slot.model, slot.adapter)
        moved[mu] = math.sqrt(sum(((end[k] - start[k]) ** 2).sum().item() for k in start))
    assert moved[100.0] < 0.5 * moved[0.0]


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_lora_plus_gives_b_ratio_times_as_large_a_learning_rate(tiny_settings, ratio):
    """LoRA+: AdamW's first step moves each parameter by its group's learning rate (times the
    sign of its gradient), so the largest move of a B entry is ratio x lr and of an A entry lr."""
    lr = 1e-3
    s = Settings.from_config({**tiny_settings.to_config(), "local-steps": 1, "lr": lr,
                              "lora-plus-ratio": ratio, "weight-decay": 0.0})
    slot, train, _ = setup(s)
    torch.manual_seed(0)  # B != 0, so that A has a gradient on the first step too
    start = {k: torch.randn_like(v) * 0.1 for k, v in
             get_lora_state(slot.model, slot.adapter).items()}
    set_lora_state(slot.model, start, slot.adapter)
    train_local(slot.model, slot.adapter, train, slot.tokenizer.pad_token_id, s.train,
                RoundPlan())
    end = get_lora_state(slot.model, slot.adapter)
    moved = lambda part: max((end[k] - start[k]).abs().max().item() for k in start if part in k)
    assert moved(".lora_B.") == pytest.approx(ratio * lr, rel=1e-3)
    assert moved(".lora_A.") == pytest.approx(lr, rel=1e-3)


def test_lora_plus_ratio_must_be_positive(tiny_settings):
    with pytest.raises(ValueError, match="lora-plus-ratio.*a number > 0"):
        Settings.from_config({**tiny_settings.to_config(), "lora-plus-ratio": 0})


# ---- the loss over response tokens, LM head in chunks (fedlora/train/loss.py) ----------------
def lora_batch(slot, train, size=4):
    from fedlora.data import collate

    return collate(train[:size], slot.tokenizer.pad_token_id)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_response_loss_and_its_gradients_equal_the_models_own(tiny_settings, chunk):
    from fedlora.train.loop import trainable_parameters
    from fedlora.train.loss import response_loss

    slot, train, _ = setup(tiny_settings)
    torch.manual_seed(0)
    set_lora_state(slot.model, {k: torch.randn_like(v) * 0.05 for k, v in
                                get_lora_state(slot.model, slot.adapter).items()}, slot.adapter)
    params = trainable_parameters(slot.model, slot.adapter)
    batch = lora_batch(slot, train)
    slot.model.eval()  # no dropout: both passes must see the same function
    reference = slot.model(**batch).loss
    expected = torch.autograd.grad(reference, params)
    loss, count = response_loss(slot.model, batch, chunk_tokens=chunk)
    got = torch.autograd.grad(loss, params)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss.item() - reference.item()) <= 1e-5 * reference.item()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_response_loss_never_builds_the_whole_batchs_logits(tiny_settings, monkeypatch):
    from fedlora.train.loss import decoder_and_head, response_loss

    slot, train, _ = setup(tiny_settings)
    _, head = decoder_and_head(slot.model)
    rows: list[int] = []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda h: rows.append(h.shape[0]) or original(h))
    batch = lora_batch(slot, train)
    loss, count = response_loss(slot.model, batch, chunk_tokens=8)
    loss.backward()
    width = batch["input_ids"].numel()
    assert rows and max(rows) <= 8  # one chunk of positions at a time, recomputed in backward
    assert sum(rows) == 2 * count < width  # forward + recompute, response positions only


def test_a_head_that_does_more_than_a_linear_map_uses_the_models_own_loss(tiny_settings):
    from fedlora.train.loss import decoder_and_head

    slot, _, _ = setup(tiny_settings)
    base = slot.model.get_base_model()
    assert decoder_and_head(slot.model) is not None
    base.config.final_logit_softcapping = 30.0
    try:
        assert decoder_and_head(slot.model) is None
    finally:
        base.config.final_logit_softcapping = None
