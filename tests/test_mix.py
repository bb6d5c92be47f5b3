"""`fedlora mix` (fedlora/mixing.py): LoRA adapters composed into one whose delta W is the
weighted sum of theirs, with fixed weights or weights searched on a few examples."""

from __future__ import annotations

import json

import pytest
import torch
from fake_grid import run_inprocess
from peft import PeftModel

from fedlora.adapters import add_lora, lora_config, save_adapter
from fedlora.cli.main import main
from fedlora.config import LoraSettings, ModelSettings, lora_scale
from fedlora.data import builtin_task
from fedlora.mixing import (
    SEARCHES,
    check_sources,
    example_batches,
    mix,
    mixed_model,
    objective,
    personal_adapter,
    read_source,
)
from fedlora.models import load_model

IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])


def write_adapter(path, targets: str, rank: int, alpha: float, rslora: bool, seed: int,
                  base: str = "tiny-llama", std: float = 0.05):
    """A LoRA adapter of tiny-llama with random B and A (so that it changes the model)."""
    settings = LoraSettings(rank=rank, alpha=alpha, use_rslora=rslora, target_modules=targets)
    model, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    model = add_lora(model, settings)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            key = name.replace(".default", "")
            state[key] = torch.randn(param.shape, generator=gen) * std
    save_adapter(state, lora_config(settings, base), path, extra={"model": base})
    return state


def delta_w(state: dict, module: str, scale: float) -> torch.Tensor:
    return scale * state[module + ".lora_B.weight"] @ state[module + ".lora_A.weight"]


Q = "base_model.model.model.layers.1.self_attn.q_proj"
K = "base_model.model.model.layers.1.self_attn.k_proj"
V = "base_model.model.model.layers.1.self_attn.v_proj"


@pytest.fixture
def two(tmp_path):
    """Adapters of different ranks, alphas, rsLoRA and modules (q,v against q,k)."""
    a = write_adapter(tmp_path / "a", "q_proj,v_proj", 4, 8.0, False, seed=1)
    b = write_adapter(tmp_path / "b", "q_proj,k_proj", 8, 4.0, True, seed=2)
    return tmp_path, a, b, lora_scale(4, 8.0, False), lora_scale(8, 4.0, True)


def test_fixed_weights_give_exactly_the_weighted_sum_of_delta_w(two):
    tmp, a, b, sa, sb = two
    assert main(["mix", "--adapters", str(tmp / "a"), str(tmp / "b"), "--weights", "0.7",
                 "-0.2", "--output-dir", str(tmp / "mix")]) == 0
    mixed = read_source(str(tmp / "mix")).factors
    product = {m: bm @ am for m, (bm, am) in mixed.items()}
    assert torch.allclose(product[Q], 0.7 * delta_w(a, Q, sa) - 0.2 * delta_w(b, Q, sb),
                          atol=1e-6)
    assert torch.allclose(product[V], 0.7 * delta_w(a, V, sa), atol=1e-6)  # only a adapts v
    assert torch.allclose(product[K], -0.2 * delta_w(b, K, sb), atol=1e-6)  # only b adapts k
    info = json.loads((tmp / "mix" / "fedlora.json").read_text())
    assert info["mix"]["weights"] == [0.7, -0.2] and info["mix"]["ranks"] == [4, 8]
    assert json.loads((tmp / "mix" / "adapter_config.json").read_text())["r"] == 12


def test_the_mix_loads_with_peft_and_merges_to_the_base_plus_the_weighted_deltas(two):
    tmp, a, b, sa, sb = two
    assert main(["mix", "--adapters", str(tmp / "a"), str(tmp / "b"), "--output-dir",
                 str(tmp / "mix")]) == 0  # no weights: the mean
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    q = base.model.layers[1].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(tmp / "mix")).merge_and_unload()
    expected = q + 0.5 * delta_w(a, Q, sa) + 0.5 * delta_w(b, Q, sb)
    assert torch.allclose(merged.model.layers[1].self_attn.q_proj.weight, expected, atol=1e-6)


def test_mixing_refuses_what_it_cannot_compose(two, tmp_path):
    tmp, *_ = two
    other = tmp_path / "other"
    write_adapter(other, "q_proj", 2, 4.0, False, seed=3, base="some/other-model")
    with pytest.raises(ValueError, match="different base models"):
        check_sources([read_source(str(tmp / "a")), read_source(str(other))])
    with pytest.raises(ValueError, match="at least two adapters"):
        check_sources([read_source(str(tmp / "a"))])
    with pytest.raises(FileNotFoundError, match="expected a LoRA adapter folder"):
        read_source(str(tmp / "nothing-here"))
    config = json.loads((tmp / "a" / "adapter_config.json").read_text())
    (tmp / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="a DoRA adapter; mixing composes LoRA adapters"):
        read_source(str(tmp / "a"))
    assert main(["mix", "--adapters", str(tmp / "b"), str(tmp / "b"), "--weights", "1",
                 "--output-dir", str(tmp_path / "m")]) == 2  # one weight for two adapters
    assert not (tmp_path / "m").exists()


def search_setup(tmp_path, seed: int = 0):
    """A trained adapter (arithmetic) and a noise adapter, mixed on the base model, and the
    training examples as batches: (MixedModel, batches)."""
    from fedlora.adapters import Workspace
    from fedlora.config import Settings
    from fedlora.data import tokenize
    from fedlora.train import RoundPlan, train_local

    settings = Settings.from_config({"model": "tiny-llama", "device": "cpu", "lora-rank": 4,
                                     "local-steps": 30, "lr": 0.02, "lora-dropout": 0.0})
    torch.manual_seed(seed)  # PEFT's draw of A
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    records = builtin_task("arithmetic", 24, seed=0)
    examples = [tokenize(r, slot.tokenizer, 64) for r in records]
    train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id, settings.train,
                RoundPlan())
    good = {k: v for k, v in slot.peft.get_state(slot.model, slot.adapter).items()}
    save_adapter(good, lora_config(settings.lora, "tiny-llama"), tmp_path / "good",
                 extra={"model": "tiny-llama"})
    write_adapter(tmp_path / "noise", "all-linear", 4, 8.0, False, seed=5, std=0.3)
    sources = [read_source(str(tmp_path / "good")), read_source(str(tmp_path / "noise"))]
    mixed, tokenizer = mixed_model(sources)
    return mixed, example_batches(records, tokenizer, "cpu", max_length=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return search_setup(tmp_path_factory.mktemp("search"))


@pytest.mark.parametrize("search", ["evolution", "gradient"])
def test_a_search_weighs_the_adapter_that_fits_the_examples_over_noise(search, setup):
    mixed, batches = setup
    at_mean = objective(mixed, batches, [0.5, 0.5], 0.05)
    weights, history = SEARCHES[search](mixed, batches, 15, 0, 0.05)
    assert weights[0] > weights[1]
    assert history[-1] < at_mean and history == sorted(history, reverse=True)
    again, _ = SEARCHES[search](mixed, batches, 15, 0, 0.05)
    assert again == weights  # seeded: the same seed finds the same weights
    if search == "evolution":
        assert SEARCHES[search](mixed, batches, 15, 1, 0.05)[0] != weights  # another seed


def test_mix_with_data_writes_the_searched_weights(two, tmp_path):
    tmp, *_ = two
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in builtin_task("arithmetic", 6, 0)))
    assert main(["mix", "--adapters", str(tmp / "a"), str(tmp / "b"), "--data", str(few),
                 "--steps", "3", "--output-dir", str(tmp_path / "m")]) == 0
    info = json.loads((tmp_path / "m" / "fedlora.json").read_text())["mix"]
    assert info["how"] == "evolution" and info["examples"] == 6 and len(info["objective"]) == 3
    assert info["objective"][-1] <= info["objective-at-mean"]


def test_fedsa_lora_clients_own_models_mix(tmp_path):
    out = tmp_path / "run"
    run_inprocess({"model": "tiny-llama", "device": "cpu", "num-server-rounds": 1,
                   "local-steps": 2, "dataset-size": 40, "strategy": "fedsa-lora",
                   "fraction-evaluate": 0.0, "min-available-nodes": 2,
                   "output-dir": str(out), "personal-dir": str(out / "personal")}, 2)
    clients = [str(out / "personal" / f"client-{i}.safetensors") for i in (0, 1)]
    own = [read_source(c) for c in clients]
    assert not torch.equal(own[0].factors[Q][0], own[1].factors[Q][0])  # private B differ
    assert torch.equal(own[0].factors[Q][1], own[1].factors[Q][1])  # shared A
    assert main(["mix", "--adapters", *clients, "--weights", "0.5", "0.5", "--output-dir",
                 str(tmp_path / "m")]) == 0
    product = {m: b @ a for m, (b, a) in read_source(str(tmp_path / "m")).factors.items()}
    expected = 0.5 * (own[0].factors[Q][0] + own[1].factors[Q][0]) @ own[0].factors[Q][1]
    assert torch.allclose(product[Q], expected, atol=1e-6)
    assert [s.rank for s in own] == [8, 8] and mix(own, [1.0, 0.0])[Q][0].shape[1] == 16


def test_personal_adapter_writes_a_fedsa_client_s_own_model(tmp_path):
    """Client p's adapter folder is the run's final one with client p's private factors in
    place of the server's (what strategy_comparison and federation_helps score)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "fedsa"
    (run / "final").mkdir(parents=True)
    (run / "personal").mkdir()
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    save_file({a: torch.ones(2, 3), b: torch.zeros(3, 2)},
              str(run / "final" / "adapter_model.safetensors"))
    (run / "final" / "adapter_config.json").write_text("{}")
    for pid in (0, 1):
        save_file({b: torch.full((3, 2), float(pid + 1))},
                  str(run / "personal" / f"client-{pid}.safetensors"))
    folders = [personal_adapter(run, pid) for pid in (0, 1)]
    assert [f.name for f in folders] == ["client-0", "client-1"]
    for pid, folder in enumerate(folders):
        state = load_file(str(folder / "adapter_model.safetensors"))
        assert torch.equal(state[a], torch.ones(2, 3))  # shared: the server's
        assert torch.equal(state[b], torch.full((3, 2), float(pid + 1)))  # its own
        assert (folder / "adapter_config.json").is_file()
