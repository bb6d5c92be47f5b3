"""Adding a method is one file: a `Method` subclass with its options, its merge and a client
step, registered with `@register`, runs a whole federation with nothing else changed.

This file is that one file (plus a test): `example-first` keeps the first reply as the global
adapter, and its clients multiply B by the option `example-shrink` before replying."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from fake_grid import run_inprocess
from safetensors.torch import load_file

from fedlora.aggregation import ClientUpdate, Factors, MergeResult
from fedlora.factors import B_SUFFIX
from fedlora.methods import METHODS, Method, MethodOptions, load_settings, register
from fedlora.methods.base import option
from fedlora.outputs import read_metrics, training_rounds


@dataclass(frozen=True)
class ShrinkOptions(MethodOptions):
    shrink: float = option("example-shrink", 1.0, "Factor applied to B before replying.")


class FirstReply(Method):
    """The global adapter is the first accepted reply; clients scale B before replying."""

    name = "example-first"
    summary = "an example: keep the first reply"
    Options = ShrinkOptions
    options: ShrinkOptions

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        first = {m: (b.float(), a.float()) for m, (b, a) in updates[0].factors.items()}
        return MergeResult(global_factors=first, residual={}, applied=first)

    def client_finish(self, state, rank, settings, store):
        return {k: v * self.options.shrink if k.endswith(B_SUFFIX) else v
                for k, v in state.items()}, rank


@pytest.fixture()
def registered():
    register(FirstReply)
    yield
    del METHODS[FirstReply.name]


CONFIG = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.01,
          "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
          "num-server-rounds": 1, "min-available-nodes": 2, "strategy": "example-first"}


def global_b(out_dir) -> list[torch.Tensor]:
    tensors = load_file(str(out_dir / "state" / "round-1.safetensors"))
    return [v for k, v in tensors.items() if k.startswith("global/") and k.endswith(B_SUFFIX)]


def test_a_method_in_one_file_runs_with_its_option_and_client_step(registered, tmp_path):
    assert load_settings({"strategy": "example-first", "example-shrink": 0.0}).options[
        "example-shrink"] == 0.0
    run_inprocess({**CONFIG, "output-dir": str(tmp_path / "zero"), "example-shrink": 0.0}, 2)
    run_inprocess({**CONFIG, "output-dir": str(tmp_path / "one")}, 2)
    assert all(torch.count_nonzero(b) == 0 for b in global_b(tmp_path / "zero"))
    assert any(torch.count_nonzero(b) > 0 for b in global_b(tmp_path / "one"))
    row = training_rounds(read_metrics(tmp_path / "one"))[0]
    assert row["clients-replied"] == 2 and row["exactness"] > 0  # one reply is not the mean


def test_its_option_is_refused_for_other_methods(registered):
    from fedlora.config import SettingsError

    with pytest.raises(SettingsError, match="'example-shrink': an option of example-first"):
        load_settings({"strategy": "fedavg", "example-shrink": 0.5})
