"""init-adapter: a run starts from a previous run's final adapter (SFT rounds, then more rounds
or DPO rounds), as the global adapter or, where the clients cannot train it whole, as a frozen
residual under a fresh adapter; either way its round 0 scores the adapter it started from."""

from __future__ import annotations

import pytest
from fake_grid import run_inprocess
from peft import PeftModel

from fedlora.cli.main import build_parser
from fedlora.cli.simulate import build_config
from fedlora.config import ModelSettings, SettingsError
from fedlora.methods import load
from fedlora.models import load_model
from fedlora.outputs import read_metrics

RUN = {"model": "tiny-llama", "device": "cpu", "local-steps": 4, "lr": 0.02, "lora-rank": 4,
       "dataset-size": 80, "eval-accuracy": 0, "eval-examples": 8, "num-server-rounds": 1,
       "target-modules": "q_proj,v_proj"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One trained round of fedavg: its final adapter and its after-round eval loss."""
    out = tmp_path_factory.mktemp("sft")
    run_inprocess({**RUN, "output-dir": str(out), "initial-eval": False}, 2)
    return out, read_metrics(out)[-1]["eval-loss"]


@pytest.mark.parametrize("strategy,placed", [("fedavg", "global adapter"),
                                             ("ffa-lora", "frozen residual")])
def test_a_run_starts_from_the_previous_runs_final_adapter(first_run, tmp_path, strategy,
                                                           placed, caplog):
    final, trained_loss = first_run
    fresh = tmp_path / "fresh"
    run_inprocess({**RUN, "strategy": strategy, "output-dir": str(fresh), "local-steps": 1}, 2)
    out = tmp_path / "continued"
    with caplog.at_level("INFO"):
        run_inprocess({**RUN, "strategy": strategy, "output-dir": str(out), "local-steps": 1,
                       "init-adapter": str(final / "final")}, 2)
    start = read_metrics(out)[0]
    assert start["round"] == 0
    # the same clients score the same held-out data with the adapter run 1 ended with
    assert start["eval-loss"] == pytest.approx(trained_loss, rel=1e-6)
    assert read_metrics(fresh)[0]["eval-loss"] > trained_loss + 0.1  # a fresh start differs
    assert f"as the {placed}" in caplog.text
    model = PeftModel.from_pretrained(load_model(ModelSettings(name="tiny-llama",
                                                               device="cpu"))[0],
                                      str(out / "final"))
    assert model.peft_config["default"].r == (4 if placed == "global adapter" else 8)


def test_an_adapter_of_other_layers_is_refused_naming_them(first_run, tmp_path):
    final, _ = first_run
    with pytest.raises(ValueError, match="adapts other layers than this run .* use the model "
                                         "and target-modules it was trained with"):
        run_inprocess({**RUN, "target-modules": "q_proj,k_proj", "output-dir": str(tmp_path),
                       "init-adapter": str(final / "final")}, 2)


def test_init_adapter_needs_peft_lora_and_an_adapter_folder(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="peft=lora only|runs of peft=lora only"):
        load({**RUN, "peft": "ia3", "init-adapter": "x"})
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["simulate", "--run-config", "init-adapter='nothing'"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nothing'} holds no PEFT adapter"):
        build_config(args)
