"""LoRA + mixture of experts (peft=lora-moe, strategy lora-moe): routing, the balance term,
per-expert averaging, the layer against a hand computation, and a federation on tiny-llama
whose exported mixture reloads with PEFT and reproduces the server's model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from fake_grid import run_inprocess
from peft import PeftModel
from test_peft_methods import IDS, RUN, recording_hook

from fedlora.adapters import peft_method
from fedlora.adapters.lora_moe import (
    LoraMoeLinear,
    balance_loss,
    expert_of,
    force_expert,
    moe_options,
    route,
    route_loss,
)
from fedlora.aggregation import ClientUpdate
from fedlora.checkpoint import read_latest
from fedlora.config import ModelSettings, SettingsError
from fedlora.methods import get_method, load
from fedlora.methods.lora_moe import NODE_EXPERT, REPLY_EXPERTS, average_experts
from fedlora.models import load_model
from fedlora.outputs import read_metrics, training_rounds
from fedlora.train import LocalTraining
from server import defences
from server.global_adapter import GlobalAdapter

MOE = {**RUN, "peft": "lora-moe", "strategy": "lora-moe", "moe-experts": 3, "moe-top-k": 2,
       "lora-rank": 2, "target-modules": "q_proj,v_proj"}


# ---- routing and the balance term -------------------------------------------------------------

def test_gates_are_the_renormalised_top_k_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    gates, probs = route(logits, top_k=2)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    assert torch.allclose(gates[0], torch.tensor([0.625, 0.375, 0.0]))  # 0.5/0.8, 0.3/0.8
    assert torch.allclose(gates.sum(-1), torch.ones(2))
    assert ((gates > 0).sum(-1) == 2).all()  # exactly top-k experts per token
    assert float(gates[1, 2]) == pytest.approx(0.8 / 0.9)


def test_the_balance_term_is_zero_when_uniform_and_positive_otherwise():
    assert float(balance_loss(torch.full((5, 4), 0.25))) == 0.0
    # importance (1.6, 0.4): mean 1.0, variance 0.36 -> CV^2 = 0.36
    skewed = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    assert float(balance_loss(skewed)) == pytest.approx(0.36)


def test_the_routing_loss_is_the_mean_negative_log_probability_of_the_own_expert():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert float(route_loss(probs, 2)) == pytest.approx(-(math.log(0.2) + math.log(0.8)) / 2)
    # one expert per example: example 0 (two tokens) expert 0, example 1 expert 2
    batch = torch.stack([probs, probs[[1, 0]]])  # (2, 2, 3)
    expected = -(math.log(0.5) + math.log(0.1) + math.log(0.8) + math.log(0.2)) / 4
    assert float(route_loss(batch, torch.tensor([0, 2]))) == pytest.approx(expected)


# ---- the merge: each expert over the clients that trained it ---------------------------------

def moe_state(values: list[float]) -> dict[str, torch.Tensor]:
    """Three experts (their A) and a router of one layer, each a 1-vector."""
    keys = ["m.moe_A.0.weight", "m.moe_A.1.weight", "m.moe_A.2.weight", "m.moe_router.weight"]
    return {k: torch.tensor([v]) for k, v in zip(keys, values)}


def test_each_expert_is_averaged_over_its_trainers_and_the_router_over_all():
    a = ClientUpdate({}, 1.0, moe_state([1.0, 10.0, 100.0, 1.0]), experts=frozenset({0}))
    b = ClientUpdate({}, 2.0, moe_state([2.0, 20.0, 200.0, 2.0]), experts=frozenset({0, 1}))
    c = ClientUpdate({}, 3.0, moe_state([3.0, 30.0, 300.0, 3.0]))  # None: every expert
    merged = average_experts([a, b, c])
    assert float(merged["m.moe_A.0.weight"]) == pytest.approx((1 + 4 + 9) / 6)
    assert float(merged["m.moe_A.1.weight"]) == pytest.approx((40 + 90) / 5)
    assert float(merged["m.moe_A.2.weight"]) == pytest.approx(300.0)  # only c trained it
    assert float(merged["m.moe_router.weight"]) == pytest.approx((1 + 4 + 9) / 6)
    assert expert_of("m.moe_B.12.weight") == 12 and expert_of("m.moe_router.weight") is None


def test_an_expert_nobody_trained_keeps_its_value_bitwise():
    settings, method = load(MOE)
    previous = moe_state([0.1, 0.2, 0.3, 0.4])
    state = GlobalAdapter(method, settings.lora, {}, 2, dense=dict(previous))
    a = ClientUpdate({}, 1.0, moe_state([1.0, 2.0, 3.0, 4.0]), experts=frozenset({0}))
    b = ClientUpdate({}, 1.0, moe_state([3.0, 4.0, 5.0, 6.0]), experts=frozenset({1}))
    state.update([a, b])
    assert torch.equal(state.dense["m.moe_A.2.weight"], previous["m.moe_A.2.weight"])
    assert float(state.dense["m.moe_A.0.weight"]) == 1.0  # a alone
    assert float(state.dense["m.moe_A.1.weight"]) == 4.0  # b alone
    assert float(state.dense["m.moe_router.weight"]) == 5.0  # both


# ---- clipping and differential privacy --------------------------------------------------------

def big_moe_state(values: list[float], n: int = 20_000) -> dict[str, torch.Tensor]:
    """`moe_state` with each tensor `n` entries of its value (for noise statistics)."""
    return {k: v.expand(n).clone() for k, v in moe_state(values).items()}


def test_clipping_keeps_the_experts_each_client_trained():
    settings, method = load({**MOE, "moe-assign": "client", "clip-norm": 0.5})
    zero = moe_state([0.0, 0.0, 0.0, 0.0])
    state = GlobalAdapter(method, settings.lora, {}, 2, dense=dict(zero),
                          clip_norm=settings.federation.clip_norm)
    a = ClientUpdate({}, 1.0, moe_state([3.0, 0.0, 0.0, 4.0]), experts=frozenset({0}))  # |u| 5
    b = ClientUpdate({}, 1.0, moe_state([0.0, 0.12, 0.0, 0.16]), experts=frozenset({1}))  # .2
    info = state.update([a, b])
    assert info["clients-clipped"] == 1
    # a scaled by 0.1 to norm 0.5: its expert 0 is 0.3, not averaged with b's untouched 0.0
    assert float(state.dense["m.moe_A.0.weight"]) == pytest.approx(0.3)
    assert float(state.dense["m.moe_A.1.weight"]) == pytest.approx(0.12)  # b, not clipped
    assert float(state.dense["m.moe_router.weight"]) == pytest.approx((0.4 + 0.16) / 2)
    assert torch.equal(state.dense["m.moe_A.2.weight"], zero["m.moe_A.2.weight"])


def test_dp_noise_on_an_expert_is_z_c_over_the_clients_that_trained_it():
    z, c = 0.5, 2.0
    settings, method = load({**MOE, "moe-assign": "client", "clip-norm": c,
                             "dp-noise-multiplier": z})
    start = big_moe_state([0.0, 0.0, 0.0, 0.0])
    state = GlobalAdapter(method, settings.lora, {}, 2, dense=dict(start), clip_norm=c,
                          noise_multiplier=z)
    same = big_moe_state([0.0, 0.0, 0.0, 0.0])  # no update: the merged mean is the start
    updates = [ClientUpdate({}, 1.0, same, experts=frozenset({0})),
               ClientUpdate({}, 5.0, same, experts=frozenset({0})),
               ClientUpdate({}, 9.0, same, experts=frozenset({1}))]
    info = state.update(updates, server_round=1)
    assert info["dp-noise-std"] == pytest.approx(z * c / 3)
    measured = {k: float(state.dense[k].std()) for k in state.dense}
    assert measured["m.moe_router.weight"] == pytest.approx(z * c / 3, rel=0.03)  # all 3
    assert measured["m.moe_A.0.weight"] == pytest.approx(z * c / 2, rel=0.03)  # 2 owners
    assert measured["m.moe_A.1.weight"] == pytest.approx(z * c / 1, rel=0.03)  # 1 owner
    assert torch.equal(state.dense["m.moe_A.2.weight"], start["m.moe_A.2.weight"])  # nobody


def test_a_dp_lora_moe_federation_reports_its_noise_and_privacy(tmp_path):
    z, c = 0.8, 1.0
    run_inprocess({**MOE, "moe-assign": "client", "clip-norm": c, "dp-noise-multiplier": z,
                   "num-server-rounds": 2, "fraction-evaluate": 0.0,
                   "output-dir": str(tmp_path)}, 2)
    rows = training_rounds(read_metrics(tmp_path))
    assert [r["dp-noise-std"] for r in rows] == pytest.approx([z * c / 2] * 2)
    assert 0 < rows[0]["dp-epsilon"] < rows[1]["dp-epsilon"] < float("inf")
    assert all(n > 0 for r in rows for n in r["update-norms"])


# ---- screening per expert --------------------------------------------------------------------

def test_each_expert_is_screened_against_its_own_trainers():
    """Every client trains every expert; one moves expert 2 by 15 where the others move it by
    about 1. Its whole change is under 10x the lower median (it passes the update screen), but
    expert 2's is 15x that expert's: the per-expert screen drops it, naming the expert."""
    settings, method = load({**MOE, "moe-assign": "learned"})
    state = GlobalAdapter(method, settings.lora, {}, 2, dense=moe_state([0.0] * 4))
    honest = [moe_state([1.0, 1.0, v, 1.0]) for v in (0.9, 1.0, 1.1)]
    hostile = moe_state([1.0, 1.0, 15.0, 1.0])
    updates = [ClientUpdate({}, 1.0, d) for d in (*honest, hostile)]
    groups = [state.group_changes(u) for u in updates]
    assert groups[3] == pytest.approx({"expert 0": 1.0, "expert 1": 1.0, "expert 2": 15.0,
                                       "routers": 1.0})
    totals = [state.moved(u) for u in updates]
    assert totals[3] < 10 * sorted(totals)[1]  # the whole-update screen lets it through
    assert defences.screen_updates(totals, totals, 10.0).dropped == ()
    screened = defences.screen_updates(totals, totals, 10.0, group_norms=groups)
    assert [i for i, _ in screened.dropped] == [3]
    assert "expert 2 change 15 is 15 times" in screened.dropped[0][1]


def test_an_expert_a_client_did_not_train_is_not_held_against_it():
    """moe-assign=client: a client's untrained experts are not merged from it, so they are not
    screened either; an expert is judged among the clients that trained it."""
    settings, method = load({**MOE, "moe-assign": "client"})
    state = GlobalAdapter(method, settings.lora, {}, 2, dense=moe_state([0.0] * 4))
    a = ClientUpdate({}, 1.0, moe_state([1.0, 99.0, 0.0, 1.0]), experts=frozenset({0}))
    b = ClientUpdate({}, 1.0, moe_state([1.2, 0.0, 0.0, 1.0]), experts=frozenset({0}))
    c = ClientUpdate({}, 1.0, moe_state([0.0, 30.0, 0.0, 1.0]), experts=frozenset({1}))
    groups = [state.group_changes(u) for u in (a, b, c)]
    assert groups[0] == pytest.approx({"expert 0": 1.0, "routers": 1.0})  # not its 99
    assert groups[2] == pytest.approx({"expert 1": 30.0, "routers": 1.0})
    assert defences.screen_groups(groups, 10.0) == []  # expert 1 has one trainer: its own scale


def test_a_plain_adapter_has_no_groups():
    settings, method = load({**RUN, "peft": "ia3"})
    state = GlobalAdapter(method, settings.lora, {}, 2, dense={"m.ia3_l.weight": torch.ones(3)})
    assert state.group_changes(ClientUpdate({}, 1.0, {"m.ia3_l.weight": torch.zeros(3)})) == {}


# ---- settings ---------------------------------------------------------------------------------

def test_lora_moe_settings_are_checked_before_a_run():
    with pytest.raises(SettingsError, match="moe-top-k.*1..moe-experts=3"):
        load({**MOE, "moe-top-k": 4})
    with pytest.raises(SettingsError, match="strategy lora-moe .* needs peft=lora-moe"):
        load({**MOE, "peft": "lora"})
    with pytest.raises(SettingsError, match=r"'moe-experts': peft=lora does not use it \(an "
                                            r"option of peft=lora-moe\)"):
        load({"moe-experts": 8})
    with pytest.raises(SettingsError, match="moe-expert-ranks"):
        load({**MOE, "moe-expert-ranks": "4,8"})
    with pytest.raises(SettingsError, match="cannot federate peft=lora-moe"):
        load({**MOE, "strategy": "flexlora"})
    with pytest.raises(SettingsError, match="moe-assign.*raw updates.*learned or client"):
        load({**MOE, "moe-assign": "cluster", "clip-norm": 1.0, "dp-noise-multiplier": 1.0})
    with pytest.raises(SettingsError, match="'moe-route'.*moe-assign=learned.*client, field or"):
        load({**MOE, "moe-route": 1.0})
    with pytest.raises(SettingsError, match="'moe-route': expected a number >= 0"):
        load({**MOE, "moe-assign": "client", "moe-route": -1.0})
    with pytest.raises(SettingsError, match="'moe-router-lr': expected a number > 0"):
        load({**MOE, "moe-router-lr": 0})
    with pytest.raises(SettingsError, match=r"'moe-route': peft=lora does not use it \(an "
                                            r"option of peft=lora-moe\)"):
        load({"moe-route": 1.0})
    with pytest.raises(SettingsError, match="'moe-shared': expected an integer >= 0"):
        load({**MOE, "moe-shared": -1})
    with pytest.raises(SettingsError, match=r"'moe-shared': peft=lora does not use it \(an "
                                            r"option of peft=lora-moe\)"):
        load({"moe-shared": 1})
    settings, _ = load({**MOE, "moe-shared": 2})
    assert peft_method("lora-moe").config(settings.lora).shared_ranks == [2, 2]  # lora-rank
    settings, _ = load({**MOE, "moe-expert-ranks": "2,4,8"})
    assert peft_method("lora-moe").config(settings.lora).expert_ranks == [2, 4, 8]


# ---- the layer --------------------------------------------------------------------------------

def moe_model(**extra):
    settings, _ = load({**MOE, "lora-dropout": 0.0, "moe-expert-ranks": "2,3,4", **extra})
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    return peft_method("lora-moe").add(base, settings.lora, "x"), settings


def test_the_layer_is_the_base_at_the_start_and_the_routed_sum_of_experts_after():
    model, settings = moe_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraMoeLinear)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # every B is zero
        for b in layer.moe_B["x"]:
            b.weight.normal_()
        router = layer.moe_router["x"].weight  # (3, 64)
        gates, _ = route(x @ router.T, 2)
        expected = layer.base_layer(x)
        for e, r in enumerate((2, 3, 4)):
            a_e, b_e = layer.moe_A["x"][e].weight, layer.moe_B["x"][e].weight
            expected = expected + gates[..., e:e + 1] * (settings.lora.alpha / r) * (
                x @ a_e.T @ b_e.T)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_a_shared_expert_adds_its_update_to_every_token_at_full_weight():
    model, settings = moe_model(**{"moe-shared": 1})
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # its B starts at zero too
        for b in [*layer.moe_B["x"], *layer.moe_shared_B["x"]]:
            b.weight.normal_()
        gates, _ = route(x @ layer.moe_router["x"].weight.T, 2)
        a_s, b_s = layer.moe_shared_A["x"][0].weight, layer.moe_shared_B["x"][0].weight
        assert a_s.shape == (2, 64) and b_s.shape == (64, 2)  # rank lora-rank
        expected = layer.base_layer(x) + (settings.lora.alpha / 2) * (x @ a_s.T @ b_s.T)
        for e, r in enumerate((2, 3, 4)):
            a_e, b_e = layer.moe_A["x"][e].weight, layer.moe_B["x"][e].weight
            expected = expected + gates[..., e:e + 1] * (settings.lora.alpha / r) * (
                x @ a_e.T @ b_e.T)
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.moe_router["x"].weight.shape == (3, 64)  # the router sees routed experts only
    assert expert_of("m.moe_shared_A.0.weight") is None  # every client trains it


def test_a_second_mixture_of_other_settings_goes_on_the_same_model():
    """What a process-wide Workspace does when a later run changes the experts: the wrapped
    q_proj still counts as q_proj, not its experts or router."""
    from fedlora.adapters import linear_module_names

    model, _ = moe_model()
    assert "q_proj" in linear_module_names(model) and "0" not in linear_module_names(model)
    other, _ = load({**MOE, "moe-experts": 2, "moe-top-k": 1})
    model = peft_method("lora-moe").add(model, other.lora, "y")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(layer.moe_A) == {"x", "y"} and len(layer.moe_A["y"]) == 2


def test_a_second_all_linear_mixture_also_wraps_the_layers_the_first_one_wrapped():
    """A resident worker's Workspace that first served q,v experts and then an all-linear run:
    the second adapter holds experts on every linear layer, as on a fresh model (PEFT finds
    an already wrapped linear layer by its class name ending in "Linear")."""
    from fedlora.adapters import Workspace

    narrow, _ = load(MOE)
    wide, _ = load({key: value for key, value in MOE.items() if key != "target-modules"})
    fresh = Workspace().get(wide.model, wide.lora, wide.train)
    expected = fresh.peft.get_state(fresh.model, fresh.adapter).keys()
    shared = Workspace()
    shared.get(narrow.model, narrow.lora, narrow.train)
    slot = shared.get(wide.model, wide.lora, wide.train)
    assert shared.loads == 1
    assert slot.peft.get_state(slot.model, slot.adapter).keys() == expected
    assert any(".q_proj.moe_A." in key for key in expected)


def test_training_records_the_balance_term_that_the_loss_adds():
    model, settings = moe_model()
    model.train()
    model(input_ids=IDS)
    extra = peft_method("lora-moe").auxiliary_loss(model, "x", settings.lora)
    assert extra is not None and float(extra.detach()) > 0
    balance = torch.stack([m.balance["x"] for m in model.modules()
                           if isinstance(m, LoraMoeLinear)]).mean().detach()
    assert float(extra.detach()) == pytest.approx(moe_options(settings.lora).balance
                                                  * float(balance))


def test_moe_route_adds_the_routing_loss_only_where_an_expert_is_forced():
    model, settings = moe_model()
    lora = replace(settings.lora, options={**settings.lora.options, "moe-route": 0.5})
    layers = [m for m in model.modules() if isinstance(m, LoraMoeLinear)]
    model.train()
    model(input_ids=IDS)  # nothing forced: the balance term alone
    balance = torch.stack([m.balance["x"] for m in layers]).mean()
    assert float(peft_method("lora-moe").auxiliary_loss(model, "x", lora).detach()) == \
        pytest.approx(moe_options(lora).balance * float(balance.detach()))
    force_expert(model, "x", 1)
    model(input_ids=IDS)
    balance = torch.stack([m.balance["x"] for m in layers]).mean()
    nll = torch.stack([m.route_nll["x"] for m in layers]).mean()
    assert float(nll.detach()) > 0
    assert float(peft_method("lora-moe").auxiliary_loss(model, "x", lora).detach()) == \
        pytest.approx(float((moe_options(lora).balance * balance + 0.5 * nll).detach()))


def test_the_routing_loss_teaches_the_router_the_forced_expert():
    model, settings = moe_model()
    lora = replace(settings.lora, options={**settings.lora.options, "moe-balance": 0.0,
                                          "moe-route": 1.0})
    routers = [p for n, p in model.named_parameters() if "moe_router" in n]
    optimizer = torch.optim.Adam(routers, lr=1e-2)
    layer = next(m for m in model.modules() if isinstance(m, LoraMoeLinear))
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, args, out: seen.append(
        torch.softmax(m.moe_router["x"](args[0].float()), -1)[..., 2].mean().detach()))
    model.eval()
    model(input_ids=IDS)
    before = float(seen[-1])
    model.train()
    force_expert(model, "x", 2)
    for _ in range(20):
        model(input_ids=IDS)
        optimizer.zero_grad()
        peft_method("lora-moe").auxiliary_loss(model, "x", lora).backward()
        optimizer.step()
    force_expert(model, "x", None)
    model.eval()
    model(input_ids=IDS)  # nothing forced now: the router alone sends tokens to expert 2
    assert before < 0.5 < float(seen[-1])


def test_the_routers_learn_at_moe_router_lr_and_the_experts_b_at_the_lora_plus_ratio():
    from fedlora.train.loop import param_groups, trainable_parameters

    model, settings = moe_model(**{"moe-shared": 1})
    lora = replace(settings.lora, options={**settings.lora.options, "moe-router-lr": 10.0})
    hooks = peft_method("lora-moe").training_hooks(model, "x", lora, LocalTraining())
    groups = param_groups(model, trainable_parameters(model, "x"), 4.0, hooks)
    names = {id(p): n for n, p in model.named_parameters()}
    by_scale = {g["lr_scale"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert sorted(by_scale) == [1.0, 4.0, 10.0]
    assert all(".moe_A." in n or ".moe_shared_A." in n for n in by_scale[1.0])
    assert all(".moe_B." in n or ".moe_shared_B." in n for n in by_scale[4.0])
    assert sum(".moe_shared_B." in n for n in by_scale[4.0]) == 4  # 2 layers x q, v
    assert all(".moe_router." in n for n in by_scale[10.0]) and len(by_scale[10.0]) == 4
    assert sum(len(v) for v in by_scale.values()) == len(trainable_parameters(model, "x"))


# ---- a federation -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    replies: list[dict] = []
    run_inprocess({**MOE, "output-dir": str(out)}, 2, hook=recording_hook(replies))
    return out, replies


def test_a_lora_moe_federation_trains_and_sends_only_experts_and_routers(moe_run):
    out, replies = moe_run
    rows = read_metrics(out)
    trained = training_rounds(rows)
    assert [r["clients-replied"] for r in trained] == [2, 2]
    assert trained[1]["train-loss"] < trained[0]["train-loss"]
    assert trained[1]["eval-loss"] < rows[0]["eval-loss"]
    assert len(replies) == 4
    # tiny-llama: 2 layers x (q_proj, v_proj) x (3 experts x (A, B) + a router)
    for state in replies:
        assert len(state) == 4 * 7
        assert all(".moe_A." in k or ".moe_B." in k or k.endswith(".moe_router.weight")
                   for k in state)


def test_the_exported_mixture_reloads_and_reproduces_the_global_model(moe_run, tmp_path,
                                                                      capsys):
    from fedlora.cli.main import main

    out, _ = moe_run
    dense = {k.removeprefix("dense/"): v for k, v in read_latest(out).tensors.items()
             if k.startswith("dense/")}
    settings, _ = load(MOE)
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    reference = peft_method("lora-moe").add(base, settings.lora, "global")
    peft_method("lora-moe").set_state(reference, "global", dense)
    expected = reference.eval()(input_ids=IDS).logits

    fresh, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    plain = fresh(input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(fresh, str(out / "final"))
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == \
        "LORA_MOE"
    tuned = loaded(input_ids=IDS).logits
    assert torch.allclose(tuned, expected, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-4)
    assert main(["generate", "--adapter", str(out / "final"), "--prompt", "2+2=",
                 "--max-new-tokens", "3"]) == 0
    assert main(["export", "--adapter", str(out / "final"), "--output-dir",
                 str(tmp_path / "merged")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_lora_moe_federates_on_a_4bit_base(tmp_path):
    run_inprocess({**MOE, "output-dir": str(tmp_path), "quantization": "4bit",
                   "num-server-rounds": 1, "local-steps": 3, "fraction-evaluate": 0.0}, 2)
    assert [r["clients-replied"] for r in training_rounds(read_metrics(tmp_path))] == [2]
    settings = ModelSettings(name="tiny-llama", device="cpu", quantization="4bit")
    plain = load_model(settings)[0](input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(load_model(settings)[0], str(tmp_path / "final"))
    tuned = loaded(input_ids=IDS).logits
    assert tuned.shape == plain.shape and not torch.allclose(tuned, plain, atol=1e-4)


def test_fedavg_also_federates_lora_moe_as_plain_tensors():
    _, method = load({**MOE, "strategy": "fedavg"})
    assert method.federates("lora-moe") and get_method("lora-moe").federates("lora-moe")
    assert not get_method("lora-moe").federates("lora")


# ---- moe-assign=client: client p owns expert p mod E ------------------------------------------

def test_a_forced_expert_is_among_every_token_s_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    gates, _ = route(logits, top_k=2, forced=2)
    assert (gates[:, 2] > 0).all() and torch.allclose(gates.sum(-1), torch.ones(2))
    assert torch.allclose(gates[0], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7]))
    assert torch.equal(route(logits, 1, forced=1)[0], torch.tensor([[0.0, 1.0, 0.0]] * 2))


def test_a_forced_expert_whose_probability_underflows_still_gets_a_finite_gate():
    """Top-1 with a forced expert the router gives probability 0 (float32 underflow): its gate
    is 1 and the gradient finite, not 0 / 0 (a fast router reached this in a real run)."""
    logits = torch.tensor([[0.0, -200.0, 10.0]], requires_grad=True)
    assert float(torch.softmax(logits.detach(), -1)[0, 1]) == 0.0
    gates, _ = route(logits, top_k=1, forced=1)
    assert torch.equal(gates.detach(), torch.tensor([[0.0, 1.0, 0.0]]))
    (gates * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.isfinite(logits.grad).all()
    two, _ = route(logits, top_k=2, forced=1)  # 2 with 1 forced: renormalised as before
    assert torch.allclose(two.detach(), torch.tensor([[0.0, 0.0, 1.0]]))


def test_with_moe_assign_client_each_client_trains_only_its_own_expert_and_the_shared(
        tmp_path):
    from fedlora import wire
    from fedlora.records import from_array_record

    sent: dict[int, list[dict]] = {0: [], 1: []}

    def by_client(received, reply):
        if reply.has_content() and reply.content.array_records:
            pid = int(reply.content.metric_records[wire.METRICS][wire.PARTITION_ID])
            sent[pid].append(from_array_record(reply.content.array_records[wire.ARRAYS]))
        return reply

    run = {**MOE, "moe-assign": "client", "moe-shared": 1, "num-server-rounds": 1,
           "fraction-evaluate": 0.0, "output-dir": str(tmp_path)}
    run_inprocess(run, 2, hook=by_client)
    initial = peft_method("lora-moe").initial_dense({k: tuple(v.shape) for k, v in
                                                     sent[0][0].items()}, seed=0)
    dense = {k.removeprefix("dense/"): v for k, v in read_latest(tmp_path).tensors.items()
             if k.startswith("dense/")}
    rows = training_rounds(read_metrics(tmp_path))
    weights = {c["partition-id"]: c["weight"] for c in rows[0]["clients"]}
    p0 = weights[0] / (weights[0] + weights[1])
    for key, value in dense.items():
        expert = expert_of(key)
        if expert is None:  # the router and the shared expert: both clients trained them
            assert torch.allclose(value, p0 * sent[0][0][key] + (1 - p0) * sent[1][0][key],
                                  atol=1e-6)
            if ".moe_shared_B." in key:
                assert not any(torch.equal(sent[c][0][key], initial[key]) for c in (0, 1))
        elif expert == 2:  # nobody owns expert 2: bitwise its start
            assert torch.equal(value, initial[key]), key
        else:  # expert e: client e's alone; the other client left it as it came
            assert torch.equal(value, sent[expert][0][key]), key
            assert torch.equal(sent[1 - expert][0][key], initial[key]), key
    assert any(not torch.equal(dense[k], initial[k]) for k in dense if ".moe_B.0." in k)
    assert sum(".moe_shared_" in k for k in dense) == 8  # 2 layers x q, v x (A, B)
    # the saved mixture, shared expert included, reloads with PEFT to the server's model
    settings, _ = load(run)
    reference = peft_method("lora-moe").add(
        load_model(ModelSettings(name="tiny-llama", device="cpu"))[0], settings.lora, "global")
    peft_method("lora-moe").set_state(reference, "global", dense)
    loaded = PeftModel.from_pretrained(
        load_model(ModelSettings(name="tiny-llama", device="cpu"))[0], str(tmp_path / "final"))
    assert torch.allclose(loaded(input_ids=IDS).logits,
                          reference.eval()(input_ids=IDS).logits, atol=1e-5)


def test_moe_assign_client_needs_a_partition_id():
    _, method = load({**MOE, "moe-assign": "client"})
    settings, _ = load(MOE)
    assert method.trained_experts(4, settings.lora) == frozenset({1})  # 4 mod 3
    with pytest.raises(ValueError, match="needs each client's partition id"):
        method.trained_experts(-1, settings.lora)


# ---- moe-assign=cluster: clients clustered by their updates own an expert per cluster ---------

def test_cosine_clusters_group_the_vectors_that_point_alike():
    from fedlora.methods.lora_moe import cosine_clusters

    vectors = [torch.tensor([1.0, 0.1]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 0.0]),
               torch.tensor([0.1, 1.0])]
    assert cosine_clusters(vectors, 2) == [0, 1, 0, 1]
    assert cosine_clusters(vectors, 4) == [0, 1, 2, 3] and cosine_clusters(vectors, 1) == [0] * 4
    with pytest.raises(ValueError, match="expected 1 <= k <= 4"):
        cosine_clusters(vectors, 5)


def test_with_moe_assign_cluster_clients_train_the_expert_of_their_cluster(tmp_path):
    from fedlora import wire
    from fedlora.records import from_array_record

    sent: dict[int, list[dict]] = {}
    told: dict[int, list] = {}

    def by_client(received, reply):
        if reply.has_content() and reply.content.array_records:
            pid = int(reply.content.metric_records[wire.METRICS][wire.PARTITION_ID])
            sent.setdefault(pid, []).append(
                from_array_record(reply.content.array_records[wire.ARRAYS]))
            told.setdefault(pid, []).append(
                received.content.config_records[wire.CONFIG].get(NODE_EXPERT))
        return reply

    run_inprocess({**MOE, "moe-assign": "cluster", "moe-experts": 2, "fraction-evaluate": 0.0,
                   "min-available-nodes": 3, "output-dir": str(tmp_path)}, 3, hook=by_client)
    rows = training_rounds(read_metrics(tmp_path))
    clusters = {int(p): e for p, e in rows[0]["moe-clusters"].items()}
    assert sorted(clusters) == [0, 1, 2] and set(clusters.values()) == {0, 1}
    assert "moe-clusters" not in rows[1]
    assert all(told[p] == [None, clusters[p]] for p in clusters)  # round 2: each told its own
    assert read_latest(tmp_path).meta["method"]["moe-clusters"] == {
        str(p): e for p, e in clusters.items()}
    # round 2: each client sent back the other expert exactly as the server had it after round 1
    round_one = {k: sum(c["weight"] / sum(x["weight"] for x in rows[0]["clients"])
                        * sent[c["partition-id"]][0][k] for c in rows[0]["clients"])
                 for k in sent[0][0]}
    for pid, expert in clusters.items():
        for key, value in sent[pid][1].items():
            if expert_of(key) == 1 - expert:
                assert torch.allclose(value, round_one[key], atol=1e-6), (pid, key)
    # and the global expert e is the mean of its cluster's round-2 replies only
    final = {k.removeprefix("dense/"): v for k, v in read_latest(tmp_path).tensors.items()
             if k.startswith("dense/")}
    weights = {c["partition-id"]: c["weight"] for c in rows[1]["clients"]}
    for key, value in final.items():
        if (expert := expert_of(key)) is not None:
            owners = [p for p, e in clusters.items() if e == expert]
            total = sum(weights[p] for p in owners)
            expected = sum(weights[p] / total * sent[p][1][key] for p in owners)
            assert torch.allclose(value, expected, atol=1e-6), key


def test_a_clustered_run_resumes_to_the_uninterrupted_result(tmp_path):
    """The clusters are part of the checkpoint: a server that dies in round 3 and resumes
    sends the same experts to the same clients and ends bit-equal."""
    from safetensors.torch import load_file

    run = {**MOE, "moe-assign": "cluster", "moe-experts": 2, "fraction-evaluate": 0.0,
           "min-available-nodes": 3, "num-server-rounds": 3, "local-steps": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inprocess({**run, "output-dir": str(straight)}, 3)

    class ServerDied(Exception):
        pass

    def die_in_round_3(msg, reply):
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 3:
            raise ServerDied
        return reply

    with pytest.raises(ServerDied):
        run_inprocess({**run, "output-dir": str(resumed)}, 3, hook=die_in_round_3)
    assert [r["round"] for r in read_metrics(resumed)] == [1, 2]
    run_inprocess({**run, "output-dir": str(resumed), "resume": True}, 3)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_latest(resumed).meta["method"] == read_latest(straight).meta["method"]


def test_a_reply_claiming_another_partition_merges_only_into_its_own_expert(tmp_path):
    """moe-assign=client: node 1001 (partition 1, expert 1) says it is partition 0 in its
    reply and moves expert 0 too; the server merges it by the partition it first declared."""
    from fedlora import wire
    from fedlora.records import from_array_record, to_array_record

    sent: dict[int, dict[str, torch.Tensor]] = {}

    def liar(received, reply):
        if not reply.has_content() or not reply.content.array_records:
            return reply
        node = reply.metadata.src_node_id
        arrays = from_array_record(reply.content.array_records[wire.ARRAYS])
        if node == 1001:
            arrays = {k: v + 1.0 if expert_of(k) == 0 else v for k, v in arrays.items()}
            reply.content.array_records[wire.ARRAYS] = to_array_record(arrays, "float32")
            reply.content.metric_records[wire.METRICS][wire.PARTITION_ID] = 0
        sent[node] = arrays
        return reply

    run_inprocess({**MOE, "moe-assign": "client", "num-server-rounds": 1,
                   "fraction-evaluate": 0.0, "output-dir": str(tmp_path)}, 2, hook=liar)
    final = {k.removeprefix("dense/"): v for k, v in read_latest(tmp_path).tensors.items()
             if k.startswith("dense/")}
    for key, value in final.items():
        if expert_of(key) == 0:  # partition 0's alone: the liar's shifted copy left out
            assert torch.equal(value, sent[1000][key]), key
        elif expert_of(key) == 1:
            assert torch.equal(value, sent[1001][key]), key


# ---- moe-assign=field: each value of a record field owns an expert ----------------------------

def test_a_forced_expert_per_example_is_among_each_of_its_tokens_top_k():
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    gates, _ = route(logits, top_k=2, forced=torch.tensor([3, 0, 3]))
    assert (gates[0, :, 3] > 0).all() and (gates[1, :, 0] > 0).all() and (gates[2, :, 3] > 0).all()
    assert ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(3, 5))


def test_with_moe_assign_field_each_family_trains_its_own_expert(tmp_path):
    from fedlora import wire
    from fedlora.data import client_records
    from fedlora.records import from_array_record

    sent: dict[int, dict] = {}
    listed: dict[int, list[int]] = {}

    def by_client(received, reply):
        if reply.has_content() and reply.content.array_records:
            metrics = reply.content.metric_records[wire.METRICS]
            pid = int(metrics[wire.PARTITION_ID])
            sent[pid] = from_array_record(reply.content.array_records[wire.ARRAYS])
            listed[pid] = list(metrics[REPLY_EXPERTS])
        return reply

    config = {**MOE, "moe-experts": 4, "moe-assign": "field", "num-server-rounds": 1,
              "dataset": "builtin:arithmetic,json,strings", "partitioner": "by-field",
              "fraction-evaluate": 0.0, "output-dir": str(tmp_path)}
    run_inprocess(config, 2, hook=by_client)
    settings, _ = load(config)
    # the sorted values arithmetic, json, strings own experts 0, 1, 2; nobody has expert 3
    own = {"arithmetic": 0, "json": 1, "strings": 2}
    for pid in (0, 1):
        train, _ = client_records(settings.data, pid, 2, settings.federation.seed)
        assert listed[pid] == sorted({own[r["task"]] for r in train})
    assert listed[0] != listed[1]  # by-field: each client its own families
    initial = peft_method("lora-moe").initial_dense({k: tuple(v.shape) for k, v in
                                                     sent[0].items()}, seed=0)
    dense = {k.removeprefix("dense/"): v for k, v in read_latest(tmp_path).tensors.items()
             if k.startswith("dense/")}
    weights = {c["partition-id"]: c["weight"]
               for c in training_rounds(read_metrics(tmp_path))[0]["clients"]}
    for key, value in dense.items():
        expert = expert_of(key)
        trainers = [p for p in (0, 1) if expert is None or expert in listed[p]]
        if not trainers:  # expert 3: bitwise its start
            assert torch.equal(value, initial[key]), key
            continue
        total = sum(weights[p] for p in trainers)
        expected = sum(weights[p] / total * sent[p][key] for p in trainers)
        assert torch.allclose(value, expected, atol=1e-6), key
        for p in {0, 1} - set(trainers):  # a client leaves the experts of others as they came
            assert torch.equal(sent[p][key], initial[key]), key
    assert all(any(not torch.equal(sent[p][k], initial[k]) for k in sent[p]
                   if expert_of(k) == e) for p in (0, 1) for e in listed[p])


def test_moe_assign_field_needs_the_run_s_dataset_and_a_listing_reply():
    from fedlora.methods.lora_moe import field_values

    settings, method = load({**MOE, "moe-assign": "field"})
    with pytest.raises(ValueError, match="expected 'moe-experts'.*0..2.*got None"):
        method.trained_experts(0, settings.lora, {})
    with pytest.raises(ValueError, match="got \\[5\\]"):
        method.trained_experts(0, settings.lora, {"moe-experts": [5]})
    assert method.trained_experts(0, settings.lora, {"moe-experts": [0, 2]}) == {0, 2}
    node, _ = load({**MOE, "moe-assign": "field", "data-path": "mine.jsonl"})
    with pytest.raises(ValueError, match="own data-path='mine.jsonl'.*moe-assign=client"):
        field_values(node, "task")
    with pytest.raises(ValueError, match="field 'topic'.*only the fields"):
        field_values(settings, "topic")
    with pytest.raises(SettingsError, match="packing.*moe-assign=field"):
        load({**MOE, "moe-assign": "field", "packing": True})


def test_the_routing_report_gives_each_record_the_mean_of_its_top_k_gates(tmp_path):
    from fedlora.models import load_model as load_with_tokenizer
    from simulations.experiments.moe_routing import gates_by_record, owners

    model, settings = moe_model()
    _, tokenizer, _ = load_with_tokenizer(ModelSettings(name="tiny-llama", device="cpu"))
    records = [{"instruction": "Add 2 and 3.", "output": "5"},
               {"instruction": "Reverse abc.", "output": "cba"}]
    gates = gates_by_record(model.eval(), tokenizer, records, 64)
    assert len(gates) == 2 and all(g.shape == (3,) for g in gates)
    assert all(float(g.sum()) == pytest.approx(1.0) for g in gates)  # top-k renormalised
    assert all(float(g.max()) < 1.0 for g in gates)  # top-2 of 3: more than one expert
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "moe-clusters": {"0": 1, "1": 0}}\n')
    assert owners(tmp_path, "cluster", 2, 3) == {0: 1, 1: 0}
    assert owners(tmp_path, "client", 4, 3) == {0: 0, 1: 1, 2: 2, 3: 0}
    assert owners(tmp_path, "learned", 2, 3) == {0: None, 1: None}
