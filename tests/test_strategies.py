"""Every merging strategy end to end: `fedlora simulate` through the real Flower apps on
tiny-llama, 3 clients, 2 rounds, ranks 4,8,16 wherever the strategy allows different ranks."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.adapters import (RESIDUAL, Workspace, get_lora_state, join_factors, set_lora_state,
                              set_residual, split_factors)
from fedlora.aggregation import STRATEGIES
from fedlora.aggregation.scaling import from_delta, lora_scale
from fedlora.config import LoraSettings, ModelSettings, TrainSettings
from fedlora.models import load_model
from fedlora.outputs import read_metrics
from test_simulation import leftover_processes, simulate

IDS = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
MIXED = (4, 8, 16)


def global_model_logits(out_dir, round_: int) -> torch.Tensor:
    """Logits of the server's global model rebuilt the way a client builds it: the global
    factors at the global rank plus the frozen residual, from the server's saved state."""
    tensors = load_file(str(out_dir / "state" / f"round-{round_}.safetensors"))
    part = lambda prefix: split_factors({k[len(prefix):]: v for k, v in tensors.items()
                                         if k.startswith(prefix)})
    factors, residual = part("global/"), part("residual/")
    rank = next(iter(factors.values()))[0].shape[1] if factors else 1
    lora = LoraSettings(rank=rank)
    slot = Workspace().get(ModelSettings(name="tiny-llama", device="cpu"), lora, TrainSettings())
    state = {k: torch.zeros_like(v) for k, v in get_lora_state(slot.model, slot.adapter).items()}
    if factors:  # flora has none: its adapter is fresh (adds nothing) and all is residual
        state = join_factors(from_delta(factors, lora_scale(rank, 16.0, False)))
    set_lora_state(slot.model, state, slot.adapter)
    set_residual(slot, lora, residual or None)
    return slot.model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_runs_exports_and_reproduces_the_global_model(tmp_path, name):
    strategy = STRATEGIES[name]
    ranks = MIXED if strategy.heterogeneous else (8,)
    out = tmp_path / name
    simulate(out, "--strategy", name, "--num-clients", "3", "--client-ranks",
             ",".join(map(str, ranks)), "--run-config",
             "lr=0.01 dataset-size=150 eval-examples=8 local-steps=4")
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
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
        assert sorted(p.name for p in (out / "personal").iterdir()) == [
            f"client-{i}.safetensors" for i in range(3)]
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
    from clients.client_app import self_prune
    from fedlora.config import Settings

    settings = Settings.from_config({"strategy": "hetlora", "hetlora-prune": 0.5,
                                     "lora-alpha": 16.0})
    b = torch.zeros(6, 4)
    b[:, :2] = torch.randn(6, 2)
    b[:, 3] = 1e-4  # a last component that contributes almost nothing
    a = torch.randn(4, 5)
    state = join_factors({"m": (b, a)})
    pruned, rank = self_prune(state, 4, settings)
    assert rank == 2  # components 3 (zero) and 4 (tiny) are dropped
    (b2, a2), = split_factors(pruned).values()
    assert b2.shape == (6, 2) and a2.shape == (2, 5)
    # delta W of the kept components is unchanged although the scale alpha/r changed
    kept = lora_scale(4, 16.0, False) * b[:, :2] @ a[:2]
    assert torch.allclose(lora_scale(2, 16.0, False) * b2 @ a2, kept, atol=1e-5)
    off = Settings.from_config({"strategy": "hetlora"})
    assert self_prune(state, 4, off) == (state, 4)


def test_fedsa_lora_client_keeps_its_own_b_across_rounds(tiny_settings):
    """The personal B a fedsa-lora client stored in context.state is what it starts from."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from clients.client_app import PERSONAL, starting_state

    slot = Workspace().get(tiny_settings.model, LoraSettings(rank=4), tiny_settings.train)
    state = get_lora_state(slot.model, slot.adapter)
    shared_a = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_A.weight")}
    personal = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_B.weight")}
    # only the message's content is read (a real Message needs a running Flower task)
    config = ConfigRecord({"server-round": 2, "rank": 4, "init-seed": 0})
    msg = SimpleNamespace(content=RecordDict({"arrays": ArrayRecord(shared_a), "config": config}))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    first = starting_state(msg, context, slot, "A")
    assert all(torch.equal(first[k], torch.zeros_like(v)) for k, v in personal.items())
    context.state[PERSONAL] = ArrayRecord(personal)
    second = starting_state(msg, context, slot, "A")
    assert all(torch.equal(second[k], v) for k, v in personal.items())
    assert all(torch.equal(second[k], v) for k, v in shared_a.items())


def test_fedsa_lora_personal_b_in_a_personal_dir_is_one_file_per_client(tiny_settings, tmp_path):
    """With personal-dir (what fedlora simulate sets), a client's B is a safetensors file read
    only when that client runs, not state held in memory for every client."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from clients.client_app import save_personal, starting_state

    slot = Workspace().get(tiny_settings.model, LoraSettings(rank=4), tiny_settings.train)
    state = get_lora_state(slot.model, slot.adapter)
    personal = {k: torch.randn_like(v) for k, v in state.items() if k.endswith("lora_B.weight")}
    config = ConfigRecord({"server-round": 2, "rank": 4, "init-seed": 0})
    msg = SimpleNamespace(content=RecordDict({"arrays": ArrayRecord({}), "config": config}))
    context = lambda pid: Context(run_id=1, node_id=pid, node_config={"partition-id": pid},
                                  state=RecordDict(), run_config={"personal-dir": str(tmp_path)})
    save_personal(context(3), personal)
    assert [p.name for p in tmp_path.iterdir()] == ["client-3.safetensors"]
    again = starting_state(msg, context(3), slot, "A")  # a fresh context: read from the file
    assert all(torch.equal(again[k], v) for k, v in personal.items())
    other = starting_state(msg, context(4), slot, "A")  # client 4 has no file yet: init B = 0
    assert all(torch.equal(other[k], torch.zeros_like(v)) for k, v in personal.items())
