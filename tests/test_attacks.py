"""The attack harness: what each simulated hostile client sends, that only a simulation runs
one, and that each attack kind against a tiny-llama federation with the default defences
leaves the global adapter finite and its eval loss near the clean run's."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from fake_grid import run_inprocess
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedlora.attacks import attack_state, claimed
from fedlora.config import AttackSettings, SettingsError
from fedlora.outputs import read_metrics, training_rounds


def states():
    gen = torch.Generator().manual_seed(0)
    start = {"x.lora_A.weight": torch.randn(2, 5, generator=gen),
             "x.lora_B.weight": torch.randn(4, 2, generator=gen)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    return start, trained


@pytest.mark.parametrize("kind, expected", [
    ("scale", lambda s, t: s + 7 * (t - s)),
    ("sign-flip", lambda s, t: s - 7 * (t - s)),
    ("constant", lambda s, t: torch.full_like(t, 7.0)),
    ("inflate-examples", lambda s, t: t),
])
def test_each_attack_sends_what_it_says(kind, expected):
    start, trained = states()
    sent = attack_state(trained, start, AttackSettings(attack=kind, attack_scale=7.0), seed=1)
    for key in trained:
        assert torch.allclose(sent[key], expected(start[key], trained[key]), atol=1e-6), key
    assert claimed(40, AttackSettings(attack=kind), 10_000_000) == (
        10_000_000 if kind == "inflate-examples" else 40)


def test_noise_has_attack_scale_times_the_rms_of_the_honest_update():
    start = {"x.lora_A.weight": torch.zeros(200, 300)}
    trained = {"x.lora_A.weight": torch.full((200, 300), 0.01)}  # RMS of the update: 0.01
    sent = attack_state(trained, start, AttackSettings(attack="noise", attack_scale=50.0), 3)
    noise = sent["x.lora_A.weight"]
    assert float(noise.std()) == pytest.approx(0.5, rel=0.02)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)


def test_hostile_clients_are_the_first_partitions():
    attack = AttackSettings(attack="scale", attack_clients=2)
    assert [attack.hostile(p) for p in range(4)] == [True, True, False, False]
    assert not AttackSettings(attack="none", attack_clients=3).hostile(0)


def test_a_deployment_node_refuses_a_run_that_asks_it_to_attack():
    from clients.client_app import node_settings

    context = Context(run_id=1, node_id=5, node_config={"node-name": "site-a"},
                      state=RecordDict(), run_config={"attack": "sign-flip"})
    with pytest.raises(SettingsError, match="a deployment node refuses them"):
        node_settings(context)


def test_fedlora_server_rejects_attack_settings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "server", "--model",
                           "tiny-llama", "--output-dir", str(tmp_path), "--run-config",
                           "attack=scale"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "are for fedlora simulate" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- in a federation

RUN = {"model": "tiny-llama", "device": "cpu", "local-steps": 3, "lr": 0.01,
       "dataset-size": 150, "eval-accuracy": 0, "eval-examples": 8, "num-server-rounds": 2,
       "min-available-nodes": 5, "min-train-nodes": 5, "min-replies": 3, "strategy": "flexlora",
       "client-ranks": "4,8"}
# eval loss of an attacked run with the default defences, against the clean run's
LOSS_BOUND = 0.02  # relative


def run(tmp_path, name: str, **extra) -> tuple[list[dict], dict]:
    out = tmp_path / name
    run_inprocess({**RUN, "output-dir": str(out), **extra}, 5)
    final = load_file(out / "final" / "adapter_model.safetensors")
    return training_rounds(read_metrics(out)), final


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return run(tmp_path_factory.mktemp("clean"), "clean")


@pytest.mark.parametrize("kind", ["scale", "sign-flip", "noise", "constant",
                                  "inflate-examples"])
def test_each_attack_meets_the_default_defences(kind, clean, tmp_path):
    rows, final = run(tmp_path, kind, attack=kind)
    assert all(torch.isfinite(t).all() for t in final.values())
    clean_loss = clean[0][-1]["eval-loss"]
    assert abs(rows[-1]["eval-loss"] - clean_loss) <= LOSS_BOUND * clean_loss, (
        rows[-1]["eval-loss"], clean_loss)
    for row in rows:  # the hostile client (partition 0) is named in every round
        if kind == "inflate-examples":
            [entry] = row["down-weighted"]
            assert "cut to" in entry["reason"]
            hostile = [c for c in row["clients"] if c["partition-id"] == 0]
            assert hostile[0]["weight"] <= row["weight-cap"] < 10_000_000
            total = sum(c["weight"] for c in row["clients"] if "weight" in c)
            assert hostile[0]["weight"] / total <= 0.5 + 1e-9  # max-share
        else:
            [failure] = row["failures"]
            assert "times the round's lower median" in failure["reason"]
            assert row["clients-replied"] == 4


def test_without_defences_a_scaled_update_ruins_the_model(clean, tmp_path):
    """The same attack with the screens off: the run the defaults prevent."""
    rows, final = run(tmp_path, "open", attack="scale", **{"max-update-ratio": 0.0})
    size = lambda adapter: max(float(t.abs().max()) for t in adapter.values())
    assert size(final) > 10 * size(clean[1])  # balanced factors: sqrt of delta W's growth
    assert rows[-1]["eval-loss"] > clean[0][-1]["eval-loss"] * (1 + LOSS_BOUND)


@pytest.mark.parametrize("rule, extra", [("median", {}), ("trimmed-mean", {}),
                                         ("krum", {"min-replies": 4})])
def test_robust_merges_hold_a_scaled_client_without_the_norm_screen(rule, extra, clean,
                                                                    tmp_path):
    rows, final = run(tmp_path, rule, attack="scale", robust=rule, **{
        "max-update-ratio": 0.0, **extra})
    assert all(torch.isfinite(t).all() for t in final.values())
    assert rows[-1]["robust"] == rule
    clean_loss = clean[0][-1]["eval-loss"]
    assert rows[-1]["eval-loss"] <= (1 + 5 * LOSS_BOUND) * clean_loss
    if rule == "krum":
        assert all(not c["merged"] for r in rows for c in r["clients"] if c["partition-id"] == 0)


def hostile_node(node: int):
    """A reply hook: `node`'s training replies become issue 17's reply (every factor 1e30,
    num-examples at the default cap), as a participant running modified code would send."""
    from flwr.app import Message, MetricRecord

    from fedlora.records import from_array_record, to_array_record

    def hook(msg, reply):
        if msg.metadata.dst_node_id != node or msg.metadata.message_type != "train":
            return reply
        state = from_array_record(reply.content.array_records["arrays"])
        metrics = dict(next(iter(reply.content.metric_records.values())))
        metrics["num-examples"] = 10_000_000
        content = RecordDict({"arrays": to_array_record({k: torch.full_like(v, 1e30)
                                                         for k, v in state.items()}),
                              "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)
    return hook


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora", "flora", "hetlora"])
def test_a_1e30_reply_claiming_10m_examples_is_dropped_in_every_round_of_a_run(strategy,
                                                                             tmp_path):
    out = tmp_path / "out"
    ranks = "8" if strategy in ("fedavg", "flora") else "4,8"
    run_inprocess({**RUN, "output-dir": str(out), "strategy": strategy, "client-ranks": ranks,
                   "fraction-evaluate": 0.0, "min-available-nodes": 4, "min-train-nodes": 4},
                  4, hook=hostile_node(1002))
    rows = training_rounds(read_metrics(out))
    assert [r["clients-replied"] for r in rows] == [3, 3]
    assert all([f["node-id"] for f in r["failures"]] == [1002] for r in rows)
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for t in final.values()) < 10


@pytest.mark.slow
def test_fedlora_simulate_runs_the_harness_and_drops_the_1e30_client(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli.main", "simulate", "--model", "tiny-llama",
         "--num-clients", "4", "--rounds", "2", "--local-steps", "2", "--output-dir", str(out),
         "--run-config", "attack=constant attack-scale=1e30 fraction-evaluate=0.0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients-replied"] for r in rows] == [3, 3]
    assert all("times the round's lower median" in r["failures"][0]["reason"] for r in rows)
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for t in final.values()) < 1e3
    assert not math.isnan(max(float(t.abs().max()) for t in final.values()))
