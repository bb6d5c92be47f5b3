"""Flower ServerApp: build the initial adapter, run the rounds, export the final adapter."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import add_lora, get_lora_state, lora_config
from fedlora.aggregation import get_strategy
from fedlora.config import ModelSettings, Settings
from fedlora.models import load_model
from fedlora.outputs import RunWriter
from fedlora.records import to_array_record
from server.strategy import LoraStrategy, log

app = ServerApp()


def initial_adapter(settings: Settings) -> tuple[dict[str, torch.Tensor], str]:
    """Seeded initial factors (A random, B zero) on the unquantized base, and the base id."""
    cpu = ModelSettings(name=settings.model.name, quantization="none", device="cpu",
                        compute_dtype="float32")
    base, _, source = load_model(cpu)
    torch.manual_seed(settings.federation.seed)  # every run with this seed starts equal
    model = add_lora(base, settings.lora, "default")
    state = get_lora_state(model, "default")
    del model, base
    return state, source.base_id


def build_strategy(settings: Settings, initial: dict[str, torch.Tensor], writer: RunWriter
                   ) -> LoraStrategy:
    """The strategy object for these settings."""
    fed = settings.federation
    return LoraStrategy(
        merge=get_strategy(fed.strategy),
        expected={k: tuple(v.shape) for k, v in initial.items()},
        wire_dtype=fed.wire_dtype, writer=writer,
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
        min_available_nodes=fed.min_available_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds and write everything under output-dir."""
    settings = Settings.from_config(context.run_config)
    started = time.perf_counter()
    initial, base_id = initial_adapter(settings)
    out_dir = Path(settings.federation.output_dir).resolve()
    writer = RunWriter(out_dir, lora_config(settings.lora, base_id),
                       {"model": settings.model.name, "base_model": base_id,
                        "settings": settings.to_config()})
    trainable = sum(v.numel() for v in initial.values())
    log(INFO, "fedlora: %s, strategy %s, rank %d, %d LoRA tensors, %d trainable parameters, "
        "output %s", settings.model.name, settings.federation.strategy, settings.lora.rank,
        len(initial), trainable, out_dir)
    strategy = build_strategy(settings, initial, writer)
    result = strategy.start(
        grid=grid, initial_arrays=to_array_record(initial, settings.federation.wire_dtype),
        num_rounds=settings.federation.num_rounds, timeout=settings.federation.round_timeout,
        train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
        evaluate_fn=strategy.end_of_round)
    final = {k: torch.from_numpy(a.numpy().copy()).float() for k, a in result.arrays.items()}
    path = writer.write_final(final)
    log(INFO, "fedlora: final adapter written to %s (%.1f s)", path, time.perf_counter() - started)
