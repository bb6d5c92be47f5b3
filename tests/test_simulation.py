"""End to end: `fedlora simulate` through the real ClientApp and ServerApp on Flower's
Simulation Engine (a private SuperLink, Ray), on tiny-llama, CPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora.config import ModelSettings
from fedlora.models import load_model
from fedlora.outputs import read_metrics, training_rounds

SMOKE = ["--model", "tiny-llama", "--num-clients", "2", "--rounds", "2", "--local-steps", "8",
         "--run-config", "lr=0.01 dataset-size=200 eval-examples=16"]


# Every process this test session starts inherits this marker, so a check for leftovers
# never counts the processes of another fedlora run on the same machine.
SESSION_ENV = {"FEDLORA_TEST_SESSION": uuid.uuid4().hex}


def leftover_processes() -> list[int]:
    """PIDs of this test session that still carry the runner's tag (which every process a
    run starts inherits)."""
    import psutil

    from fedlora.runtime.processes import TAG_ENV_VAR

    key, value = next(iter(SESSION_ENV.items()))
    pids = []
    for proc in psutil.process_iter():
        try:
            environ = proc.environ()
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
        if TAG_ENV_VAR in environ and environ.get(key) == value:
            pids.append(proc.pid)
    return pids


def simulate(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli.main", "simulate", "--output-dir", str(out_dir),
         *SMOKE, *extra], capture_output=True, text=True, timeout=900,
        env={**os.environ, **SESSION_ENV, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_run(out_dir: Path, quantization: str = "none") -> list[dict]:
    """metrics.jsonl has both rounds and the final adapter loads and changes logits."""
    rows = read_metrics(out_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval-loss"] is not None and rows[0]["eval-clients"] == 2  # the base model
    rows = training_rounds(rows)
    for r in rows:
        assert r["clients-replied"] == 2 and r["clients-failed"] == 0
        assert r["bytes-up"] > 0 and r["bytes-down"] > 0 and r["seconds"] > 0
        assert r["eval-loss"] is not None
    assert rows[1]["train-loss"] < rows[0]["train-loss"]  # training loss goes down
    for n in (1, 2):
        assert (out_dir / "rounds" / str(n) / "adapter_model.safetensors").exists()
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu",
                                          quantization=quantization))
    ids = torch.tensor([[258, 117, 115, 101, 114, 10, 50, 43, 50]])
    plain = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(out_dir / "final"))
    tuned = model(input_ids=ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)
    return rows


@pytest.mark.slow
def test_two_clients_two_rounds_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = simulate(out)
    rows = check_run(out)
    # Communication accounting: every client gets the global adapter and returns its own.
    per_client = rows[0]["bytes-down-per-client"]
    assert rows[0]["bytes-down"] == 2 * per_client
    assert {c["bytes-up"] for c in rows[0]["clients"]} == {per_client}
    assert rows[1]["bytes-total"] == sum(r["bytes-up"] + r["bytes-down"] for r in rows)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-llama"
    assert "round" in proc.stdout and "final adapter" in proc.stdout  # summary table
    assert leftover_processes() == []


@pytest.mark.slow
def test_qlora_4bit_end_to_end_with_fp16_wire(tmp_path):
    out = tmp_path / "run4"
    simulate(out, "--quantization", "4bit", "--wire-dtype", "float16")
    rows = check_run(out, quantization="4bit")
    wire_bytes = rows[0]["bytes-down-per-client"]
    # fp16 on the wire: 2 bytes per trainable parameter (+ small per-array headers)
    assert 16384 * 2 < wire_bytes < 16384 * 2 + 256 * 28
    assert leftover_processes() == []


@pytest.mark.slow
def test_client_level_dp_with_clipping_on_the_nodes_reports_epsilon(tmp_path):
    """ffa-lora with dp-clipping=client: each node clips its update to clip-norm, the server
    accepts the clipped replies (a reply above it would be dropped), adds noise and reports
    the epsilon of Flower's RDP accountant after each round."""
    from server.privacy import PrivacyLedger

    out, clip = tmp_path / "dp", 1e-3
    simulate(out, "--run-config", SMOKE[-1] + f" strategy=ffa-lora clip-norm={clip} "
             "dp-noise-multiplier=0.8 dp-clipping=client dp-delta=1e-4")
    rows = training_rounds(read_metrics(out))
    ledger = PrivacyLedger(0.8, 1e-4, population=2)
    for row in rows:
        assert row["clients-replied"] == 2 and row["clients-failed"] == 0
        # the nodes clipped: every update the server measured sits at the bound, none above
        assert all(clip * 0.999 <= n <= clip * (1 + 1e-4) for n in row["update-norms"])
        assert row["dp-noise-std"] == pytest.approx(0.8 * clip / 2)
        ledger.record()
        assert row["dp-epsilon"] == pytest.approx(ledger.epsilon())
        assert row["dp-delta"] == 1e-4 and row["dp-noise-multiplier"] == 0.8
    assert rows[1]["dp-epsilon"] > rows[0]["dp-epsilon"] > 0
    PeftModel.from_pretrained(load_model(ModelSettings(name="tiny-llama", device="cpu"))[0],
                              str(out / "final"))
    assert leftover_processes() == []


@pytest.mark.slow
def test_accuracy_per_family_per_client_and_on_the_server_each_round(tmp_path):
    """eval-accuracy: each client scores greedy answers on its held-out split (pooled per task
    family by the server); server-eval: the server scores the global adapter itself."""
    out = tmp_path / "acc"
    simulate(out, "--run-config", SMOKE[-1] + " dataset=builtin:units,json partitioner=by-field "
             "eval-accuracy=4 server-eval=6 max-new-tokens=8")
    for row in training_rounds(read_metrics(out)):
        assert 0.0 <= row["accuracy"] <= 1.0
        assert {"accuracy/units", "accuracy/json"} <= row.keys()
        assert sorted(row["client-accuracy"]) == ["0", "1"]  # one value per client
        # client 0 holds units only, client 1 json only (by-field): the pooled figure is
        # their mean since both scored 4 answers
        assert row["accuracy"] == pytest.approx(sum(row["client-accuracy"].values()) / 2)
        assert row["server-eval-examples"] == 6 and row["server-eval-loss"] > 0
        assert 0.0 <= row["server-accuracy"] <= 1.0
