"""Every merging strategy end to end: `fedlora simulate` through the real Flower apps on
tiny-llama, 3 clients, 2 rounds, ranks 4,8,16 wherever the strategy allows different ranks."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_simulation import leftover_processes, simulate

from fedlora.adapters import (
    RESIDUAL,
    Workspace,
    flatten,
    get_lora_state,
    set_lora_state,
    set_residual,
    unflatten,
)
from fedlora.config import LoraSettings, ModelSettings, TrainSettings, lora_scale
from fedlora.factors import from_delta
from fedlora.methods import get_method, load_settings, method_of, strategies_for
from fedlora.models import load_model
from fedlora.outputs import read_metrics, training_rounds

IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
MIXED = (4, 8, 16)


def global_model_logits(out_dir, round_: int) -> torch.Tensor:
    """Logits of the server's global model rebuilt the way a client builds it: the global
    factors at the global rank plus the frozen residual, from the server's saved state."""
    tensors = load_file(str(out_dir / "state" / f"round-{round_}.safetensors"))
    part = lambda prefix: unflatten({k[len(prefix):]: v for k, v in tensors.items()
                                         if k.startswith(prefix)})
    factors, residual = part("global/"), part("residual/")
    rank = next(iter(factors.values()))[0].shape[1] if factors else 1
    lora = LoraSettings(rank=rank)
    slot = Workspace().get(ModelSettings(name="tiny-llama", device="cpu"), lora, TrainSettings())
    state = {k: torch.zeros_like(v) for k, v in get_lora_state(slot.model, slot.adapter).items()}
    if factors:  # flora has none: its adapter is fresh (adds nothing) and all is residual
        state = flatten(from_delta(factors, lora_scale(rank, 16.0, False)))
    set_lora_state(slot.model, state, slot.adapter)
    set_residual(slot, lora, residual or None)
    return slot.model.eval()(input_ids=IDS).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", strategies_for())
def test_strategy_runs_exports_and_reproduces_the_global_model(tmp_path, name):
    strategy = get_method(name)
    ranks = MIXED if strategy.heterogeneous else (8,)
    out = tmp_path / name
    simulate(out, "--strategy", name, "--num-clients", "3", "--client-ranks",
             ",".join(map(str, ranks)), "--run-config",
             "lr=0.01 dataset-size=150 eval-examples=8 local-steps=4")
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    rows = training_rounds(rows)
    for row in rows:
        assert row["clients-replied"] == 3 and row["clients-failed"] == 0, row["failures"]
        assert row["eval-clients"] == 3 and row["eval-failed"] == 0 and row["eval-loss"] > 0
        assert sorted(c["lora-rank"] for c in row["clients"]) == sorted(
            ranks[i % len(ranks)] for i in range(3))
        if strategy.shares == "A":
            assert "exactness" not in row  # personalised: no global delta W to compare
        elif strategy.exact:
            assert row["exactness"] < 1e-4, row["exactness"]
            assert max(row["exactness-per-module"].values()) < 1e-4
            assert "layers.0.self_attn.q_proj" in row["exactness-per-module"]
        else:
            assert row["exactness"] > 1e-6, row["exactness"]
    if strategy.shares == "A":  # each client's personal B: a file, not memory of the worker
        assert sorted(p.name for p in (out / "personal").iterdir()) == sorted(
            f"client-{i}{version}.safetensors" for i in range(3) for version in ("",
                                                                              "-previous"))
    if strategy.heterogeneous:  # a client's upload is proportional to its rank
        up = {c["lora-rank"]: c["bytes-up"] for c in rows[0]["clients"]}
        assert up[4] < up[8] < up[16]
    if strategy.uses_residual:
        assert rows[-1]["residual-rank"] > 0
    # The exported adapter loads with PEFT and reproduces the global model exactly.
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    plain = base(input_ids=IDS).logits
    exported = PeftModel.from_pretrained(base, str(out / "final"))(input_ids=IDS).logits
    assert torch.allclose(exported, global_model_logits(out, 2), atol=1e-4)
    if strategy.shares != "A":  # fedsa-lora's global B is zero: the model is personal
        assert not torch.allclose(exported, plain, atol=1e-4)
    assert config["r"] >= max(ranks) and RESIDUAL not in config.get("target_modules", [])
    assert leftover_processes() == []


def test_hetlora_self_pruning_replies_at_a_smaller_rank_with_the_same_kept_update():
    settings = load_settings({"strategy": "hetlora", "hetlora-prune": 0.5, "lora-alpha": 16.0})
    method = method_of(settings)
    b = torch.zeros(6, 4)
    b[:, 0], b[:, 1] = 1.0, 0.8  # two strong components (the second 0.8 of the first) ...
    b[:, 3] = 1e-4  # ... a zero one and a last one that contributes almost nothing
    a = torch.linspace(-1, 1, 20).reshape(4, 5) + 0.5
    state = flatten({"m": (b, a)})
    pruned, rank = method.client_finish(state, 4, settings, store=None)
    assert rank == 2  # components 3 (zero) and 4 (tiny) are dropped
    (b2, a2), = unflatten(pruned).values()
    assert b2.shape == (6, 2) and a2.shape == (2, 5)
    # delta W of the kept components is unchanged although the scale alpha/r changed
    kept = lora_scale(4, 16.0, False) * b[:, :2] @ a[:2]
    assert torch.allclose(lora_scale(2, 16.0, False) * b2 @ a2, kept, atol=1e-5)
    assert method.reply_rank(4, 2) == 2 and method.reply_rank(4, 8) == 4  # never larger
    off = load_settings({"strategy": "hetlora"})
    assert method_of(off).client_finish(state, 4, off, store=None) == (state, 4)
    assert method_of(off).reply_rank(4, 2) == 4


def fedsa_message(arrays: dict):
    """Only a message's content is read (a real Message needs a running Flower task)."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    config = ConfigRecord({"server-round": 2, "rank": 4, "init-seed": 0})
    return SimpleNamespace(content=RecordDict({"arrays": ArrayRecord(arrays), "config": config}))


def test_fedsa_lora_client_keeps_its_own_b_across_rounds(tiny_settings):
    """The personal B a fedsa-lora client kept in its context is what it starts from."""
    from flwr.app import Context, RecordDict

    from clients.client_app import received_state
    from clients.personal import personal_store

    slot = Workspace().get(tiny_settings.model, LoraSettings(rank=4), tiny_settings.train)
    state = get_lora_state(slot.model, slot.adapter)
    shared_a = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_A.weight")}
    personal = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_B.weight")}
    msg = fedsa_message(shared_a)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    method, store = get_method("fedsa-lora"), personal_store("", context, 0, server_round=1)
    first = method.client_start(received_state(msg, slot, 4), store)
    assert all(torch.equal(first[k], torch.zeros_like(v)) for k, v in personal.items())
    trained = {**shared_a, **personal}
    method.client_finish(trained, 4, tiny_settings, store)  # keeps B in the context
    second = method.client_start(received_state(msg, slot, 4),
                                 personal_store("", context, 0, server_round=2))
    assert all(torch.equal(second[k], v) for k, v in personal.items())
    assert all(torch.equal(second[k], v) for k, v in shared_a.items())
    assert method.shared(second).keys() == shared_a.keys()  # B never leaves the client


def test_fedsa_lora_personal_b_in_a_personal_dir_is_one_file_per_client(tiny_settings, tmp_path):
    """With personal-dir (what fedlora simulate sets), a client's B is a safetensors file read
    only when that client runs, not state held in memory for every client."""
    from flwr.app import Context, RecordDict

    from clients.client_app import received_state
    from clients.personal import personal_store

    slot = Workspace().get(tiny_settings.model, LoraSettings(rank=4), tiny_settings.train)
    state = get_lora_state(slot.model, slot.adapter)
    personal = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_B.weight")}
    context = lambda pid: Context(run_id=1, node_id=pid, node_config={"partition-id": pid},
                                  state=RecordDict(), run_config={})
    method, msg = get_method("fedsa-lora"), fedsa_message({})
    store = lambda pid, rnd: personal_store(str(tmp_path), context(pid), pid, server_round=rnd)
    store(3, 1).save(personal)
    assert [p.name for p in tmp_path.iterdir()] == ["client-3.safetensors"]
    # a fresh context in round 2: read from the file
    again = method.client_start(received_state(msg, slot, 4), store(3, 2))
    assert all(torch.equal(again[k], v) for k, v in personal.items())
    # client 4 has no file yet: the seeded B, zero
    other = method.client_start(received_state(msg, slot, 4), store(4, 2))
    assert all(torch.equal(other[k], torch.zeros_like(v)) for k, v in personal.items())


def test_fedsa_lora_with_client_clipping_keeps_the_trained_b(tmp_path):
    """Client clipping acts on what is sent (A); the B a client keeps is the one it trained.
    (Before the methods had a file of their own, clipping ran first and reset the kept B to
    the B the client had started from, so with dp-clipping=client B never trained.)"""
    from fake_grid import run_inprocess
    from safetensors.torch import load_file

    run_inprocess({"model": "tiny-llama", "device": "cpu", "local-steps": 3, "lr": 0.05,
                   "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
                   "num-server-rounds": 1, "min-available-nodes": 2, "strategy": "fedsa-lora",
                   "clip-norm": 0.01, "dp-clipping": "client", "output-dir": str(tmp_path),
                   "personal-dir": str(tmp_path / "personal")}, 2)
    for pid in (0, 1):
        kept = load_file(str(tmp_path / "personal" / f"client-{pid}.safetensors"))
        assert kept and all(k.endswith("lora_B.weight") for k in kept)
        assert any(torch.count_nonzero(b) > 0 for b in kept.values())  # B moved from zero
    row = training_rounds(read_metrics(tmp_path))[0]
    assert row["clients-replied"] == 2 and row["clients-failed"] == 0
