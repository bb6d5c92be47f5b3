"""Adding a PEFT method is one file: a `PeftMethod` subclass with its `Options`, registered
with `@register_peft`, trains and federates with nothing else changed (`fedlora settings`
lists it, other methods refuse its option, fedavg federates it as plain tensors).

This file is that one file (plus a test): `example-rescale` is IA3 on the keys and values,
and its option `example-rescale-ffn` says whether the FFN input is rescaled too."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from fake_grid import run_inprocess
from peft import IA3Config
from safetensors.torch import load_file

from fedlora.adapters import PEFT_METHODS, PeftMethod, PeftOptions, options_of, register_peft
from fedlora.config import LoraSettings, SettingsError, setting
from fedlora.methods import load_settings
from fedlora.outputs import read_metrics, training_rounds


@dataclass(frozen=True)
class RescaleOptions(PeftOptions):
    ffn: bool = setting("example-rescale-ffn", True, "Rescale the FFN input (down_proj) too.")


class Rescale(PeftMethod):
    """IA3 vectors on keys and values, and on the FFN input when example-rescale-ffn."""

    name = "example-rescale"
    summary = "an example: IA3 on keys and values (and the FFN input)"
    unused = ("lora-rank", "target-modules")
    why_unused = "it picks its modules itself"
    Options = RescaleOptions

    def config(self, lora: LoraSettings, base_id: str | None = None) -> IA3Config:
        ffn = ["down_proj"] if options_of(lora, RescaleOptions).ffn else []
        return IA3Config(target_modules=["k_proj", "v_proj", *ffn], feedforward_modules=ffn,
                         task_type="CAUSAL_LM", base_model_name_or_path=base_id)

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        return {k: torch.ones(shape) for k, shape in shapes.items()}


@pytest.fixture()
def registered():
    register_peft(Rescale)
    yield
    del PEFT_METHODS[Rescale.name]


CONFIG = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.05,
          "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
          "num-server-rounds": 1, "min-available-nodes": 2, "peft": "example-rescale"}


def final_keys(out_dir) -> set[str]:
    return set(load_file(str(out_dir / "final" / "adapter_model.safetensors")))


def test_a_peft_method_in_one_file_federates_with_its_option(registered, tmp_path):
    assert load_settings({"peft": "example-rescale", "example-rescale-ffn": False}).lora.options[
        "example-rescale-ffn"] is False
    run_inprocess({**CONFIG, "output-dir": str(tmp_path / "kv"), "example-rescale-ffn": False}, 2)
    run_inprocess({**CONFIG, "output-dir": str(tmp_path / "all")}, 2)
    kv, both = final_keys(tmp_path / "kv"), final_keys(tmp_path / "all")
    assert kv and not any("down_proj" in k for k in kv)
    assert kv < both and any("down_proj" in k for k in both)
    config = json.loads((tmp_path / "kv" / "final" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"k_proj", "v_proj"}
    assert training_rounds(read_metrics(tmp_path / "kv"))[0]["clients-replied"] == 2


def test_its_option_is_refused_for_other_peft_methods_and_listed(registered, capsys):
    with pytest.raises(SettingsError, match=r"'example-rescale-ffn': peft=lora does not use it "
                                            r"\(an option of peft=example-rescale\)"):
        load_settings({"example-rescale-ffn": False})
    from fedlora.cli.main import main

    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "    example-rescale-ffn" in out
    assert any(line.startswith("| fedavg ") and "example-rescale" in line
               for line in out.splitlines())
