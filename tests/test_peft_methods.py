"""PEFT methods beside LoRA (`peft`, fedlora.adapters): settings refused before a run, the
plain-tensor path of the server (validation, clipping, server optimiser, checkpoint) and
whole federations through the real ServerApp and ClientApp (in process, tiny-llama)."""

from __future__ import annotations

import math

import pytest
import torch
from fake_grid import run_inprocess
from flwr.app import Context, RecordDict
from peft import PeftModel
from safetensors.torch import load_file

from clients.client_app import node_settings
from fedlora import wire
from fedlora.adapters import PEFT_METHODS, peft_method
from fedlora.adapters.virtual_tokens import causal_logits
from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.privacy import clip_all
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS
from fedlora.checkpoint import read_latest
from fedlora.config import ModelSettings, SettingsError
from fedlora.methods import get_method, load
from fedlora.models import load_model, model_skeleton, resolve_source
from fedlora.outputs import read_metrics, training_rounds
from fedlora.records import from_array_record
from server.global_adapter import GlobalAdapter

RUN = {"model": "tiny-llama", "device": "cpu", "num-server-rounds": 2, "local-steps": 8,
       "lr": 0.05, "dataset-size": 200, "eval-examples": 16, "min-available-nodes": 2}
IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
# every method federated as plain tensors, with its own settings for these runs
PLAIN = {"ia3": {}, "prompt-tuning": {"num-virtual-tokens": 4},
         "p-tuning": {"num-virtual-tokens": 4}, "prefix-tuning": {"num-virtual-tokens": 4},
         "p-tuning-v2": {"num-virtual-tokens": 4}, "adapter": {"adapter-size": 16}}
VIRTUAL = ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"]  # virtual tokens


def shapes_of(method: str) -> dict[str, tuple[int, ...]]:
    settings, _ = load({**RUN, "peft": method, **PLAIN[method]})
    return peft_method(method).dense_shapes(model_skeleton(resolve_source("tiny-llama")),
                                            settings.lora)


# ---- settings --------------------------------------------------------------------------------

def test_every_registered_method_has_a_name_a_summary_and_a_config():
    assert {"lora", "ia3"} <= set(PEFT_METHODS)
    settings, _ = load(RUN)
    for name, method in PEFT_METHODS.items():
        assert method.name == name and method.summary
        assert method.config(settings.lora).peft_type is not None


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora", "fedex-lora", "ffa-lora",
                                      "fedsa-lora"])
def test_a_lora_only_strategy_refuses_ia3_naming_the_strategies_that_work(strategy):
    with pytest.raises(SettingsError, match=r"strategy '.*' merges LoRA factors and cannot "
                                            r"federate peft=ia3; use strategy fedavg, fedprox"):
        load({"peft": "ia3", "strategy": strategy})


@pytest.mark.parametrize("key,value", [("lora-rank", 4), ("lora-alpha", 8.0),
                                       ("client-ranks", "4,8"), ("use-rslora", True),
                                       ("lora-plus-ratio", 16.0)])
def test_ia3_refuses_the_settings_of_low_rank_factors(key, value):
    with pytest.raises(SettingsError, match=f"setting '{key}': peft=ia3 does not use it"):
        load({"peft": "ia3", key: value})


def test_an_unknown_method_and_median_on_ia3_are_clear_errors():
    with pytest.raises(SettingsError, match=r"expected one of .*\bia3, lora.*did you mean 'ia3'"):
        load({"peft": "ia4"})
    with pytest.raises(SettingsError, match="robust.*no low-rank factors; use robust=krum"):
        load({"peft": "ia3", "robust": "median", "min-replies": 3, "min-train-nodes": 3})


def test_a_node_configured_for_another_peft_method_is_refused():
    context = Context(run_id=1, node_id=1, node_config={"peft": "lora", "node-name": "site-a"},
                      state=RecordDict(), run_config={"peft": "ia3"})
    with pytest.raises(SettingsError, match="this node is configured for peft=lora, but the "
                                            "run trains peft=ia3"):
        node_settings(context)
    same = Context(run_id=1, node_id=1, node_config={"peft": "ia3"}, state=RecordDict(),
                   run_config={"peft": "ia3"})
    assert node_settings(same)[0].lora.peft == "ia3"


# ---- the server's plain tensors ---------------------------------------------------------------

def test_ia3_shapes_come_from_the_skeleton_and_start_at_one():
    shapes = shapes_of("ia3")
    # tiny-llama: 2 layers x (k_proj, v_proj: (out, 1); down_proj: (1, in))
    assert len(shapes) == 6
    assert all(k.endswith(".ia3_l") for k in shapes)
    assert {s for k, s in shapes.items() if "down_proj" in k} == {(1, 128)}
    init = peft_method("ia3").initial_dense(shapes, seed=0)
    assert all(torch.equal(t, torch.ones(shapes[k])) for k, t in init.items())


def test_prompt_tuning_starts_from_one_seeded_prompt_of_its_length():
    shapes = shapes_of("prompt-tuning")
    assert shapes == {"prompt_embeddings": (4, 64)}  # 4 virtual tokens x tiny-llama's hidden
    a = peft_method("prompt-tuning").initial_dense(shapes, seed=3)["prompt_embeddings"]
    b = peft_method("prompt-tuning").initial_dense(shapes, seed=3)["prompt_embeddings"]
    c = peft_method("prompt-tuning").initial_dense(shapes, seed=4)["prompt_embeddings"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.01 < float(a.std()) < 0.03


def test_prompt_tuning_refuses_target_modules_and_lora_refuses_virtual_tokens():
    with pytest.raises(SettingsError, match="'target-modules': peft=prompt-tuning does not"):
        load({"peft": "prompt-tuning", "target-modules": "q_proj"})
    with pytest.raises(SettingsError, match="'num-virtual-tokens': peft=lora does not use it"):
        load({"num-virtual-tokens": 8})
    with pytest.raises(SettingsError, match="num-virtual-tokens"):
        load({"peft": "prompt-tuning", "num-virtual-tokens": 0})


def prompt_model(method: str):
    settings, _ = load({**RUN, "peft": method, **PLAIN[method]})
    base, tokenizer, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    model = peft_method(method).add(base, settings.lora, "soft")
    with torch.no_grad():  # virtual tokens far from zero, so that they matter
        model.prompt_encoder["soft"].embedding.weight.normal_(0, 1.0, generator=torch.Generator(
        ).manual_seed(0))
    return model, tokenizer


@pytest.mark.parametrize("method", VIRTUAL)
def test_virtual_tokens_first_loss_equals_peft_own_loss_and_gradients(method):
    from fedlora.train.loss import response_loss

    model, _ = prompt_model(method)
    ids = torch.tensor([[5, 9, 17, 33, 65, 2, 0], [7, 8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 33, 65, 2, -100], [-100, -100, 9, 10, 11, 12, 13]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    weight = model.prompt_encoder["soft"].embedding.weight
    ours, count = response_loss(model, batch)
    (grad_ours,) = torch.autograd.grad(ours, weight)
    theirs = model(**batch).loss  # PEFT's forward: virtual tokens first
    (grad_theirs,) = torch.autograd.grad(theirs, weight)
    assert count == 8
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-5)
    assert float(grad_ours.abs().sum()) > 0


@pytest.mark.parametrize("method", VIRTUAL)
def test_generation_with_virtual_tokens_is_greedy_over_the_prompted_logits(method):
    from fedlora.inference import generate

    model, tokenizer = prompt_model(method)
    prompts = ["Convert 3 km to m.", "2+2="]
    texts = generate(model, tokenizer, prompts, max_new_tokens=1, batch_size=2)
    for prompt, text in zip(prompts, texts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = causal_logits(model, ids, torch.ones_like(ids))
        assert logits.shape[1] == ids.shape[1]  # the prompt's positions are dropped
        expected = tokenizer.decode([int(logits[0, -1].argmax())], skip_special_tokens=True)
        assert text == expected


@pytest.mark.parametrize("method", ["prefix-tuning", "p-tuning-v2"])
def test_prefix_methods_refuse_gradient_checkpointing(method):
    with pytest.raises(SettingsError, match=f"'gradient-checkpointing': peft={method}"):
        load({"peft": method, "gradient-checkpointing": True})


def dense_state(values: list[float]) -> dict[str, torch.Tensor]:
    return {"x.ia3_l": torch.tensor([[values[0]], [values[1]]]), "y.ia3_l": torch.tensor(
        [[values[2]]])}


def test_fedavg_averages_plain_tensors_by_examples():
    updates = [ClientUpdate({}, 1.0, dense_state([1.0, 2.0, 3.0])),
               ClientUpdate({}, 3.0, dense_state([5.0, 6.0, 7.0]))]
    result = get_method("fedavg").merge(updates, {}, export_rank=0)
    assert torch.allclose(result.dense["x.ia3_l"], torch.tensor([[4.0], [5.0]]))
    assert torch.allclose(result.dense["y.ia3_l"], torch.tensor([[6.0]]))
    with pytest.raises(ValueError, match="client 1 sent other tensors than client 0"):
        get_method("fedavg").merge([updates[0], ClientUpdate({}, 1.0, {"x.ia3_l": torch.ones(
            2, 1)})], {}, export_rank=0)


def test_clipping_bounds_the_joint_norm_of_factors_and_plain_tensors():
    ref_f = {"m": (torch.zeros(2, 1), torch.zeros(1, 2))}
    f = {"m": (torch.tensor([[3.0], [0.0]]), torch.zeros(1, 2))}
    ref_d, d = {"v": torch.ones(1, 1)}, {"v": torch.tensor([[5.0]])}  # change 4
    factors, dense, norm, scale = clip_all(f, d, ref_f, ref_d, clip_norm=1.0)
    assert norm == pytest.approx(5.0) and scale == pytest.approx(0.2)
    assert torch.allclose(factors["m"][0], torch.tensor([[0.6], [0.0]]))
    assert torch.allclose(dense["v"], torch.tensor([[1.8]]))  # 1 + 0.2 * 4


def test_server_optimiser_steps_plain_tensors_like_factors():
    opt = SERVER_OPTIMIZERS["fedavgm"](lr=1.0, momentum=0.5)
    prev, merged = {"v": torch.ones(3)}, {"v": torch.full((3,), 3.0)}
    first = opt.step_dense(prev, merged)  # v = 2 (FedAvgM: v = momentum v + delta) -> 1 + 2
    assert torch.allclose(first["v"], torch.full((3,), 3.0))
    second = opt.step_dense(first, {"v": torch.full((3,), 4.0)})  # v = 0.5 * 2 + 1 -> 3 + 2
    assert torch.allclose(second["v"], torch.full((3,), 5.0))
    assert set(opt.state_dict()) == {"m/dense/v"}


def test_global_state_with_plain_tensors_round_trips_a_checkpoint():
    settings, method = load({**RUN, "peft": "ia3", "server-optimizer": "fedadam"})
    state = GlobalAdapter(method, settings.lora, {}, 8, dense=dense_state([1.0, 1.0, 1.0]),
                          optimizer=SERVER_OPTIMIZERS["fedadam"]())
    state.update([ClientUpdate({}, 1.0, dense_state([2.0, 3.0, 4.0]))])
    saved = state.tensors()
    assert any(k.startswith("dense/") for k in saved)
    assert any(k.startswith("optimizer/m/dense/") for k in saved)
    again = GlobalAdapter(method, settings.lora, {}, 8, dense=dense_state([1.0, 1.0, 1.0]),
                          optimizer=SERVER_OPTIMIZERS["fedadam"]())
    again.restore(saved)
    assert all(torch.equal(again.dense[k], state.dense[k]) for k in state.dense)
    exported, rank = again.export()
    assert rank == 0 and exported.keys() == state.dense.keys()
    other = GlobalAdapter(method, settings.lora, {}, 8, dense={"z.ia3_l": torch.ones(1)})
    with pytest.raises(ValueError, match="differ from this run's PEFT method"):
        other.restore(saved)


# ---- whole federations ------------------------------------------------------------------------

def recording_hook(replies: list[dict]):
    def hook(received, reply):
        if reply.content.array_records:
            replies.append(from_array_record(reply.content.array_records[wire.ARRAYS]))
        return reply
    return hook


@pytest.fixture(scope="module", params=sorted(PLAIN))
def plain_run(request, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method)
    replies: list[dict] = []
    run_inprocess({**RUN, "peft": method, **PLAIN[method], "output-dir": str(out)}, 2,
                  hook=recording_hook(replies))
    return method, out, replies


def test_a_plain_tensor_federation_trains_and_sends_only_the_methods_tensors(plain_run):
    method, out, replies = plain_run
    rows = read_metrics(out)
    trained = training_rounds(rows)
    assert [r["clients-replied"] for r in trained] == [2, 2]
    assert trained[1]["train-loss"] < trained[0]["train-loss"]
    assert trained[1]["eval-loss"] < rows[0]["eval-loss"]  # better than where it started
    shapes = shapes_of(method)
    assert len(replies) == 4
    for state in replies:  # exactly the method's tensors, nothing of the base, no LoRA factor
        assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    values = sum(math.prod(s) for s in shapes.values())
    for row in trained:
        for client in row["clients"]:  # float32 values plus the record's small framing
            assert values * 4 <= client["bytes-up"] < values * 4 + 2048
            assert client["train-tokens"] > 0 and client["train-seconds"] > 0
    assert "exactness" not in trained[0]  # no low-rank delta W to compare


def test_the_global_tensors_are_the_example_weighted_mean_of_what_the_clients_sent(plain_run):
    """FedAvg of the trained tensors themselves: for P-tuning and prefix tuning the encoder's
    weights, never the prompt or prefixes it computes (which PEFT's state dict would hold)."""
    method, out, replies = plain_run
    last = training_rounds(read_metrics(out))[-1]
    weights = [c["weight"] for c in last["clients"]]  # the merge's (max-share)
    p = [w / sum(weights) for w in weights]
    dense = {k.removeprefix("dense/"): v for k, v in read_latest(out).tensors.items()
             if k.startswith("dense/")}
    round_2 = replies[2:]  # the two replies of the last round, in the order of its clients
    for key, merged in dense.items():
        expected = sum(pi * r[key].double() for pi, r in zip(p, round_2))
        assert torch.allclose(merged.double(), expected, atol=1e-6), key
    if method in ("p-tuning", "prefix-tuning"):  # the encoder's weights, not its output
        assert "prompt_embeddings" not in round_2[0]
        layer = "mlp_head.0" if method == "p-tuning" else "transform.0"
        assert {"prompt_encoder.embedding.weight", f"prompt_encoder.{layer}.weight"} <= set(
            round_2[0])


def test_the_export_loads_with_peft_and_reproduces_the_global_model(plain_run):
    method, out, _ = plain_run
    settings, _ = load({**RUN, "peft": method, **PLAIN[method]})
    checkpoint = read_latest(out)
    dense = {k.removeprefix("dense/"): v for k, v in checkpoint.tensors.items()
             if k.startswith("dense/")}
    initial = peft_method(method).initial_dense(shapes_of(method), seed=0)
    assert dense.keys() == initial.keys()
    assert not any(torch.equal(dense[k], initial[k]) for k in dense)  # it trained
    final = load_file(out / "final" / "adapter_model.safetensors")
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    # PEFT's own format: an encoder saves what it computes, the others what they send
    encoded = method in ("p-tuning", "prefix-tuning")
    assert final.keys() == ({"prompt_embeddings"} if encoded else dense.keys())

    mask = torch.ones_like(IDS)
    plain = base(input_ids=IDS).logits
    reference = peft_method(method).add(base, settings.lora, "global")
    peft_method(method).set_state(reference, "global", dense)
    expected = causal_logits(reference, IDS, mask)

    fresh, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    loaded = PeftModel.from_pretrained(fresh, str(out / "final"))
    assert loaded.peft_config["default"].peft_type == peft_method(method).config(
        settings.lora).peft_type
    tuned = causal_logits(loaded, IDS, mask)
    assert tuned.shape == plain.shape
    assert torch.allclose(tuned, expected, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-4)


@pytest.mark.parametrize("method", sorted(PLAIN))
def test_each_plain_method_federates_on_a_4bit_base(method, tmp_path):
    run_inprocess({**RUN, "peft": method, **PLAIN[method], "output-dir": str(tmp_path),
                   "quantization": "4bit", "num-server-rounds": 1, "local-steps": 3,
                   "fraction-evaluate": 0.0}, 2)
    assert [r["clients-replied"] for r in training_rounds(read_metrics(tmp_path))] == [2]
    settings = ModelSettings(name="tiny-llama", device="cpu", quantization="4bit")
    base, _, _ = load_model(settings)
    plain = base(input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(load_model(settings)[0], str(tmp_path / "final"))
    tuned = causal_logits(loaded, IDS, torch.ones_like(IDS))
    assert tuned.shape == plain.shape and not torch.allclose(tuned, plain, atol=1e-4)


def test_a_reply_with_wrong_shapes_or_lora_keys_is_dropped(tmp_path):
    def hostile(received, reply):
        if reply.metadata.src_node_id != 1001 or not reply.content.array_records:
            return reply
        arrays = from_array_record(reply.content.array_records[wire.ARRAYS])
        key = sorted(arrays)[0]
        if received.content.config_records[wire.CONFIG][wire.SERVER_ROUND] == 1:
            arrays[key] = torch.ones(3, 3)  # wrong shape
        else:
            arrays["x.lora_A.weight"] = torch.ones(2, 2)  # a key the method does not have
        from fedlora.records import to_array_record
        reply.content.array_records[wire.ARRAYS] = to_array_record(arrays, "float32")
        return reply

    run_inprocess({**RUN, "peft": "ia3", "output-dir": str(tmp_path), "local-steps": 2,
                   "min-replies": 1}, 2, hook=hostile)
    rows = training_rounds(read_metrics(tmp_path))
    assert [r["clients-replied"] for r in rows] == [1, 1]
    reasons = [f["reason"] for r in rows for f in r["failures"]]
    assert "shape (3, 3)" in reasons[0]
    assert "unexpected ['x.lora_A.weight']" in reasons[1]


def test_ia3_with_clipping_dp_and_a_server_optimiser_runs_and_resumes(tmp_path):
    extra = {"peft": "ia3", "local-steps": 2, "clip-norm": 0.5, "dp-noise-multiplier": 0.1,
             "server-optimizer": "fedavgm", "fraction-evaluate": 0.0}
    straight = tmp_path / "straight"
    run_inprocess({**RUN, **extra, "output-dir": str(straight)}, 2)
    rows = training_rounds(read_metrics(straight))
    assert all(r["dp-noise-std"] > 0 and max(r["update-norms"]) > 0 for r in rows)
    resumed = tmp_path / "resumed"

    class ServerDied(Exception):
        pass

    def die_in_round_2(msg, reply):
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 2:
            raise ServerDied
        return reply

    with pytest.raises(ServerDied):
        run_inprocess({**RUN, **extra, "output-dir": str(resumed)}, 2, hook=die_in_round_2)
    assert [r["round"] for r in read_metrics(resumed)] == [1]
    run_inprocess({**RUN, **extra, "output-dir": str(resumed), "resume": True}, 2)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ia3", "prefix-tuning"])
def test_export_merges_ia3_and_refuses_virtual_tokens_with_the_reason(method, tmp_path, capsys):
    from fedlora.adapters import save_adapter
    from fedlora.cli.main import main

    settings, _ = load({**RUN, "peft": method, **PLAIN[method]})
    peft = peft_method(method)
    shapes = shapes_of(method)
    source = resolve_source("tiny-llama")
    state = peft.saved_state(peft.initial_dense(shapes, seed=0),
                             model_skeleton(source).config, source)
    save_adapter(state, peft.config(settings.lora, "tiny-llama"), tmp_path / "adapter",
                 extra={"model": "tiny-llama"})
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--output-dir",
                 str(tmp_path / "merged")])
    if method == "ia3":
        assert code == 0 and (tmp_path / "merged" / "config.json").exists()
    else:
        assert code == 2 and not (tmp_path / "merged").exists()
        assert "PREFIX_TUNING adapter: it adds virtual tokens" in capsys.readouterr().err
