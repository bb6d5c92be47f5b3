"""Record-level DP at every site (dp-sgd, fedlora.train.dp_sgd): per-example clipping against
a hand computation, the noise's std, the accountant against Opacus', a target epsilon met,
the node's budget, the PEFT methods covered and refused, and epsilon in metrics.jsonl."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from fake_grid import run_inprocess

from fedlora.adapters import PEFT_METHODS, Workspace, peft_method
from fedlora.adapters import option_keys as peft_option_keys
from fedlora.config import Settings, SettingsError
from fedlora.data import client_records, collate, tokenize_records
from fedlora.methods import load
from fedlora.outputs import read_metrics, training_rounds
from fedlora.train import RoundPlan, train_local
from fedlora.train.dp_sgd import (
    PerExampleGradients,
    add_noise,
    clip_per_example,
    epsilon_of,
    noise_for,
    noise_warning,
    plan_dp_sgd,
    private_step,
    prv_epsilon,
    rdp_epsilon,
    secret_generator,
)
from fedlora.train.loop import trainable_parameters
from fedlora.train.loss import response_loss

COVERED = sorted(name for name, m in PEFT_METHODS.items() if m.dp_sgd)
TINY = {"model": "tiny-llama", "device": "cpu", "lora-rank": 4, "lora-dropout": 0.0,
        "dataset-size": 60}


def tiny(peft: str = "lora", **extra):
    """A tiny model with a `peft` adapter whose every trainable parameter is moved off its
    initial value (LoRA's B starts at 0), and five tokenized training examples."""
    virtual = {"num-virtual-tokens": 4} if "tuning" in peft else {}
    settings = Settings.from_config({**TINY, "peft": peft, **virtual, **extra},
                                    peft_options=peft_option_keys())
    torch.manual_seed(0)
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    params = trainable_parameters(slot.model, slot.adapter)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    records, _ = client_records(settings.data, 0, 1, seed=0)
    examples = tokenize_records(records[:5], slot.tokenizer, 48)
    slot.model.train()
    return settings, slot, params, examples


def by_hand(model, params, examples, pad_id, clip, expected_batch):
    """Each example's gradient alone (plain autograd of its own mean response loss), clipped
    to `clip` over all parameters, summed and divided by the expected batch."""
    total = [torch.zeros_like(p) for p in params]
    for example in examples:
        loss, _ = response_loss(model, collate([example], pad_id))
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        factor = min(1.0, clip / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / expected_batch for t in total]


def example_norms(model, params, examples, pad_id):
    norms = []
    for example in examples:
        loss, _ = response_loss(model, collate([example], pad_id))
        norms.append(math.sqrt(sum(float((g ** 2).sum())
                                   for g in torch.autograd.grad(loss, params))))
    return norms


@pytest.mark.parametrize("peft", COVERED)
def test_clipped_per_example_gradients_equal_a_hand_computation(peft):
    """At noise 0 and sample rate 1, one DP-SGD step's gradient is the sum of each example's
    own gradient clipped to C, over the expected batch, computed in micro-batches of 2."""
    settings, slot, params, examples = tiny(peft)
    pad = slot.tokenizer.pad_token_id
    norms = example_norms(slot.model, params, examples, pad)
    clip = sorted(norms)[2]  # some examples are clipped, some are not
    assert min(norms) < clip < max(norms)
    expected = by_hand(slot.model, params, examples, pad, clip, expected_batch=8)
    plan = plan_dp_sgd(settings.train, 1, 8)
    plan = type(plan)(clip=clip, noise_multiplier=0.0, sample_rate=1.0, expected_batch=8,
                      steps=1, delta=1e-5, target_epsilon=math.inf)
    how = peft_method(peft).dp_sgd
    with PerExampleGradients(slot.model, params, how) as grads:
        _, _, sampled = private_step(slot.model, params, examples, pad, plan, 2,
                                     secret_generator(), grads, nullcontext)
    assert sampled == len(examples)
    for p, want in zip(params, expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7)


def tiny_pairs(slot) -> list[dict]:
    """Five reference-scored preference pairs (the reference: the model as it is)."""
    from fedlora.data.preference import to_pair, tokenize_pair
    from fedlora.train.preference import score_reference

    pairs = [tokenize_pair(to_pair({"prompt": f"Q: {a} + {a}?\nA:", "chosen": f" {2 * a}",
                                    "rejected": " I cannot say" + "." * a}, "pair"),
                           slot.tokenizer, 48) for a in range(1, 6)]
    return score_reference(slot.model, pairs, slot.tokenizer.pad_token_id)


@pytest.mark.parametrize("peft", COVERED)
def test_objective_dpo_clips_each_pairs_gradient_as_one_example(peft):
    """dp-sgd with objective=dpo: the unit is a pair. One step's gradient (noise 0, rate 1,
    micro-batches of 2 pairs) is each pair's own DPO-loss gradient (both of its sequences)
    clipped to C, summed, over the expected batch."""
    from fedlora.train.preference import dpo_unit_losses, pair_losses, pair_scores

    settings, slot, params, _ = tiny(peft)
    pad = slot.tokenizer.pad_token_id
    pairs = tiny_pairs(slot)
    slot.model.train()
    own = [torch.autograd.grad(pair_losses(pair_scores(slot.model, [pair], pad), 0.5)[0], params,
                               allow_unused=True) for pair in pairs]
    own = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in own]
    norms = [math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs)) for gs in own]
    clip = sorted(norms)[2]
    assert min(norms) < clip < max(norms)
    expected = [sum(min(1.0, clip / (n + 1e-6)) * gs[i] for gs, n in zip(own, norms)) / 8
                for i in range(len(params))]
    plan = type(plan_dp_sgd(settings.train, 1, 8))(
        clip=clip, noise_multiplier=0.0, sample_rate=1.0, expected_batch=8, steps=1,
        delta=1e-5, target_epsilon=math.inf)
    with PerExampleGradients(slot.model, params, peft_method(peft).dp_sgd) as grads:
        _, tokens, sampled = private_step(slot.model, params, pairs, pad, plan, 2,
                                          secret_generator(), grads, nullcontext,
                                          unit_losses=dpo_unit_losses(0.5, "sigmoid", pad))
    assert sampled == len(pairs)
    assert tokens == sum(len(p["input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    for p, want in zip(params, expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7)


def test_a_dpo_federation_with_dp_sgd_spends_its_budget_per_pair(tmp_path):
    """objective=dpo and dp-sgd in one run: each site's epsilon per round (its pairs are the
    records the accountant counts) and the preference figures in metrics.jsonl."""
    from test_dpo import RUN, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=80)
    run_inprocess({**RUN, "dataset": data, "dp-sgd": True, "dp-sgd-epsilon": 8.0,
                   "output-dir": str(tmp_path)}, 2)
    rounds = training_rounds(read_metrics(tmp_path))
    spent = [{c["partition-id"]: c["dp-sgd-epsilon"] for c in r["clients"]} for r in rounds]
    assert [sorted(s) for s in spent] == [[0, 1], [0, 1]]
    assert all(0 < spent[0][pid] < spent[1][pid] <= 8.0 for pid in (0, 1))
    assert all("pref-margin" in r and r["pref-pairs"] > 0 for r in rounds)


def test_clip_per_example_scales_only_the_examples_above_the_norm():
    grads = [torch.tensor([[3.0, 0.0], [0.3, 0.0]]), torch.tensor([[4.0], [0.4]])]
    summed, norms = clip_per_example(grads, clip=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    # example 0 (norm 5) is scaled to norm 1, example 1 (norm 0.5) is kept
    torch.testing.assert_close(summed[0], torch.tensor([0.6 + 0.3, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(summed[1], torch.tensor([0.8 + 0.4]), atol=1e-6, rtol=0)


def test_the_noise_has_std_sigma_times_clip():
    sigma, clip = 1.3, 0.7
    noisy = add_noise([torch.zeros(200_000)], sigma * clip, secret_generator())[0]
    # the sample std of 200k normals is within 0.5 % of the true one with overwhelming odds
    assert abs(float(noisy.std()) / (sigma * clip) - 1) < 0.005
    assert abs(float(noisy.mean())) < 5 * sigma * clip / math.sqrt(200_000)


def test_a_step_that_samples_no_example_is_noise_of_std_sigma_clip_over_the_batch():
    """The step's own wiring: the gradient of a step with an empty sample is the noise
    alone, of std sigma C / expected batch on every coordinate."""
    settings, slot, params, examples = tiny("lora")
    plan = plan_dp_sgd(settings.train, 1, 8)
    plan = type(plan)(clip=0.5, noise_multiplier=2.0, sample_rate=0.0, expected_batch=8,
                      steps=1, delta=1e-5, target_epsilon=math.inf)
    with PerExampleGradients(slot.model, params) as grads:
        _, tokens, sampled = private_step(slot.model, params, examples,
                                          slot.tokenizer.pad_token_id, plan, 4,
                                          secret_generator(), grads, nullcontext)
    assert (tokens, sampled) == (0, 0)
    noise = torch.cat([p.grad.flatten() for p in params])
    assert noise.numel() > 5_000  # so the sample std is within 4 % with odds ~1 - 1e-6
    assert abs(float(noise.std()) / (2.0 * 0.5 / 8) - 1) < 0.04


def test_two_generators_draw_different_noise():
    """The noise is seeded by the operating system, not by the run's seed."""
    a = add_noise([torch.zeros(8)], 1.0, secret_generator())[0]
    b = add_noise([torch.zeros(8)], 1.0, secret_generator())[0]
    assert not torch.equal(a, b)


def test_the_accountant_is_the_tighter_of_opacus_prv_and_rdp_stepping_their_own():
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp, prv = RDPAccountant(), PRVAccountant()
    for _ in range(120):
        rdp.step(noise_multiplier=0.9, sample_rate=0.04)
        prv.step(noise_multiplier=0.9, sample_rate=0.04)
    epsilon = epsilon_of(0.9, 0.04, 120, 1e-5)
    assert epsilon == pytest.approx(prv.get_epsilon(1e-5))
    assert epsilon < 0.9 * rdp.get_epsilon(1e-5)  # PRV is the tighter bound here
    # far from the usual regime PRV's discretisation fails: RDP's bound stands alone
    assert prv_epsilon(0.1, 0.9, 50, 1e-5) == math.inf
    assert epsilon_of(0.1, 0.9, 50, 1e-5) == rdp_epsilon(0.1, 0.9, 50, 1e-5) > 100
    assert epsilon_of(0.9, 0.04, 0, 1e-5) == 0.0
    assert epsilon_of(0.0, 0.04, 10, 1e-5) == math.inf


def test_the_noise_for_a_budget_is_the_least_that_fits_it():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = noise_for(8.0, 1e-5, 256 / 900, 12)  # the DP settings of docs/dp-sgd.md
    assert epsilon_of(sigma, 256 / 900, 12, 1e-5) <= 8.0
    assert epsilon_of(sigma * (1 - 2e-3), 256 / 900, 12, 1e-5) > 8.0  # the least, to 1e-3
    rdp_sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5,
                                     sample_rate=256 / 900, steps=12, accountant="rdp")
    assert sigma < 0.95 * rdp_sigma  # less noise than the RDP accountant needs


def test_a_target_epsilon_gives_a_run_within_it():
    train = Settings.from_config({"dp-sgd": True, "dp-sgd-epsilon": 8.0, "local-steps": 10,
                                  "batch-size": 4, "grad-accum": 2}).train
    plan = plan_dp_sgd(train, num_rounds=5, num_examples=400)
    assert plan.sample_rate == pytest.approx(8 / 400) and plan.steps == 50
    assert plan.expected_batch == 8
    assert 7.5 < plan.planned_epsilon <= 8.0  # derived to fit, not far below
    assert plan.noise_multiplier == pytest.approx(noise_for(8.0, 1e-5, 0.02, 50))
    assert plan.epsilon(10) < plan.epsilon(30) < plan.planned_epsilon


def test_a_plan_whose_noise_swamps_each_step_is_warned_about():
    """The default run (batch 4, 30 steps, ~900 examples, the default adapter's 4.9M entries)
    gets noise of about 210 C per step and a warning naming its figures; a batch of 256 over
    115k entries (q,v at rank 2) gets about 1.3 C and none."""
    default = plan_dp_sgd(Settings.from_config({"dp-sgd": True}).train, num_rounds=3,
                          num_examples=900)
    assert default.noise_to_signal(4_884_480) == pytest.approx(
        default.noise_multiplier * math.sqrt(4_884_480) / 4)
    assert 200 < default.noise_to_signal(4_884_480) < 260
    warning = noise_warning(default, 4_884_480)
    assert warning is not None and "4,884,480 trained entries" in warning
    assert "expected batch 4" in warning and "grad-accum" in warning
    large = plan_dp_sgd(Settings.from_config({"dp-sgd": True, "batch-size": 64, "grad-accum": 4,
                                              "local-steps": 4}).train,
                        num_rounds=3, num_examples=900)
    assert large.noise_to_signal(115_200) < 2 and noise_warning(large, 115_200) is None


def test_a_noise_multiplier_that_spends_more_than_the_target_is_refused():
    train = Settings.from_config({"dp-sgd": True, "dp-sgd-epsilon": 2.0,
                                  "dp-sgd-noise-multiplier": 0.5}).train
    with pytest.raises(SettingsError, match=r"dp-sgd-epsilon.*would spend epsilon .*above "
                                            r"its budget dp-sgd-epsilon=2"):
        plan_dp_sgd(train, num_rounds=3, num_examples=100)


def test_fewer_examples_than_one_expected_batch_are_refused():
    train = Settings.from_config({"dp-sgd": True, "batch-size": 8}).train
    with pytest.raises(SettingsError, match="8/5 > 1"):
        plan_dp_sgd(train, num_rounds=1, num_examples=5)


@pytest.mark.parametrize("peft", sorted(n for n, m in PEFT_METHODS.items() if not m.dp_sgd))
def test_an_uncovered_peft_method_is_refused_with_its_reason(peft):
    method = peft_method(peft)
    with pytest.raises(SettingsError, match=rf"'dp-sgd': peft={peft} is not covered") as err:
        load({"peft": peft, "strategy": "lora-moe" if peft == "lora-moe" else "fedavg",
              "dp-sgd": True})
    assert method.why_no_dp_sgd in str(err.value)


@pytest.mark.parametrize(("extra", "key"), [({"packing": True}, "packing"),
                                            ({"gradient-checkpointing": True},
                                             "gradient-checkpointing")])
def test_packing_and_gradient_checkpointing_are_refused_with_dp_sgd(extra, key):
    with pytest.raises(SettingsError, match=f"setting '{key}'"):
        Settings.from_config({"dp-sgd": True, **extra})


def test_train_local_with_dp_sgd_moves_only_the_adapter_and_reports_its_plan():
    settings, slot, params, _ = tiny("lora", **{"dp-sgd": True, "local-steps": 3,
                                                "grad-accum": 2, "batch-size": 2})
    records, _ = client_records(settings.data, 0, 1, seed=0)
    examples = tokenize_records(records, slot.tokenizer, 48)
    frozen = {n: p.clone() for n, p in slot.model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    result = train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                         settings.train, RoundPlan(1, 2, 0))
    assert result.steps == 3 and result.dp_sgd is not None
    assert result.dp_sgd.expected_batch == 4 and result.dp_sgd.steps == 6
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p, frozen[n]) for n, p in slot.model.named_parameters()
               if n in frozen)
    assert not any(hasattr(p, "grad_sample") for p in params)  # the hooks are gone


BASE = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.01,
        "dataset-size": 80, "fraction-evaluate": 0.0, "eval-accuracy": 0,
        "min-available-nodes": 2, "dp-sgd": True}


@pytest.mark.parametrize("secure", [False, True])
def test_a_federation_writes_each_clients_epsilon_per_round(tmp_path, caplog, secure):
    """Each site's epsilon spent, per round, in metrics.jsonl: with secure aggregation too
    (the audit's secure-aggregation+dp-sgd arm had none before)."""
    with caplog.at_level("WARNING", logger="fedlora.client"):
        run_inprocess({**BASE, "num-server-rounds": 2, "dp-sgd-epsilon": 4.0,
                       "secure-aggregation": secure, "output-dir": str(tmp_path)}, 2)
    # batch 4 over tiny-llama's adapter: each node warns once (round 1) that noise swamps it
    noisy = [r.getMessage() for r in caplog.records if "noise has about" in r.getMessage()]
    assert len(noisy) == 2 and all("expected batch 4" in m for m in noisy)
    rounds = training_rounds(read_metrics(tmp_path))
    spent = [{c["partition-id"]: c["dp-sgd-epsilon"] for c in r["clients"]} for r in rounds]
    assert [sorted(s) for s in spent] == [[0, 1], [0, 1]]
    for pid in (0, 1):
        assert 0 < spent[0][pid] < spent[1][pid] <= 4.0
        assert spent[1][pid] > 3.5  # the derived noise spends (nearly) all of the target
    # the nodes keep their (not privatised) training losses to themselves
    sent = [c.get("train-loss") for r in rounds for c in r["clients"]]
    assert all(v is None or math.isnan(v) for v in sent)


def test_a_node_refuses_a_run_over_its_budget(tmp_path):
    """The run asks for noise that spends epsilon ~ 50; node site-a's budget is 1, which the
    run config's dp-sgd-epsilon cannot raise; site-b has no budget of its own."""
    nodes = {0: {"node-name": "site-a", "dp-sgd-epsilon": 1.0}, 1: {"node-name": "site-b"}}
    run_inprocess({**BASE, "num-server-rounds": 1, "min-train-nodes": 1, "min-replies": 1,
                   "dp-sgd-noise-multiplier": 0.3, "dp-sgd-epsilon": 1000.0,
                   "output-dir": str(tmp_path)}, 2, node_config=nodes.get)
    row = training_rounds(read_metrics(tmp_path))[0]
    assert [c["node-id"] for c in row["clients"]] == [1001]
    [failure] = row["failures"]
    assert failure["node-id"] == 1000
    reason = failure["reason"]
    assert "dp-sgd-epsilon" in reason and "budget dp-sgd-epsilon=1" in reason
    spent = float(reason.split("would spend epsilon ")[1].split()[0])
    assert spent > 1.0


def test_a_node_with_a_budget_refuses_a_run_without_dp_sgd():
    from flwr.app import Context, RecordDict

    from clients.client_app import node_settings

    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"node-name": "a", "dp-sgd-epsilon": 3.0})
    with pytest.raises(SettingsError, match=r"budget \(dp-sgd-epsilon=3.0\).*without dp-sgd"):
        node_settings(context)
    context.run_config.update({"dp-sgd": True, "dp-sgd-epsilon": 50.0, "dp-sgd-delta": 0.1})
    train = node_settings(context)[0].train
    assert (train.dp_sgd_epsilon, train.dp_sgd_delta) == (3.0, 1e-5)  # the node's own


def test_fedlora_client_puts_its_budget_in_the_node_config():
    import argparse

    from fedlora.cli.client import add_arguments, node_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--server", "127.0.0.1:1", "--insecure", "--name", "a",
                              "--dp-sgd-epsilon", "2.5", "--dp-sgd-delta", "1e-6"])
    config = node_config(args)
    assert (config["dp-sgd-epsilon"], config["dp-sgd-delta"]) == (2.5, 1e-6)
    alone = parser.parse_args(["--server", "127.0.0.1:1", "--insecure", "--dp-sgd-delta", "1e-6"])
    with pytest.raises(ValueError, match="--dp-sgd-delta is the delta of a budget"):
        node_config(alone)
    bad = parser.parse_args(["--server", "127.0.0.1:1", "--insecure", "--dp-sgd-epsilon", "-1"])
    with pytest.raises(SettingsError, match="'dp-sgd-epsilon': expected a number > 0"):
        node_config(bad)


def test_a_node_counts_its_steps_and_without_a_count_assumes_every_earlier_round_trained():
    """A node that joins at round 3 with no count (a resumed run, a fresh process) counts
    rounds 1-2 as trained: the epsilon it reports never undercounts."""
    from flwr.app import Context, RecordDict

    from clients.client_app import spend_dp_sgd

    train = Settings.from_config({"dp-sgd": True, "local-steps": 5}).train
    plan = plan_dp_sgd(train, num_rounds=4, num_examples=100)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert spend_dp_sgd(context, plan, server_round=3, steps=5) == plan.epsilon(15)
    assert spend_dp_sgd(context, plan, server_round=4, steps=5) == plan.epsilon(20)
    assert plan.epsilon(20) == plan.planned_epsilon <= 8.0
