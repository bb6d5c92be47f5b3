"""Flower ServerApp: build the initial adapter, run the rounds, export the final adapter."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import lora_config, shared_init, target_shapes
from fedlora.aggregation import get_strategy
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS
from fedlora.config import Settings
from fedlora.models import model_skeleton, resolve_source
from fedlora.outputs import RunWriter
from fedlora.records import to_array_record
from server.global_adapter import GlobalAdapter
from server.strategy import LoraStrategy, log

app = ServerApp()


def adapted_shapes(settings: Settings) -> tuple[dict[str, tuple[int, int]], str]:
    """{module: (d, k)} of every adapted layer (from the model's structure only); its base id."""
    source = resolve_source(settings.model.name)
    return target_shapes(model_skeleton(source), settings.lora.modules()), source.base_id


def build_global(settings: Settings, shapes: dict[str, tuple[int, int]]) -> GlobalAdapter:
    """The initial global adapter: seeded A (as every client draws it), B zero."""
    fed = settings.federation
    optimizer = None
    if fed.server_optimizer != "none":
        optimizer = SERVER_OPTIMIZERS[fed.server_optimizer](**server_optimizer_options(fed))
    strategy = get_strategy(fed.strategy)
    if fed.strategy == "hetlora":
        strategy = strategy.with_options(weighting=fed.hetlora_weighting)
    return GlobalAdapter(strategy=strategy, lora=settings.lora,
                         factors=shared_init(shapes, settings.global_rank, fed.seed),
                         global_rank=settings.global_rank,
                         residual_budget=fed.residual_rank, optimizer=optimizer)


def server_optimizer_options(fed) -> dict:
    """Hyperparameters of the server optimiser from the settings (lr 0 = its default)."""
    options = {"momentum": fed.server_momentum, "beta2": fed.server_beta2, "tau": fed.server_tau}
    if fed.server_lr > 0:
        options["lr"] = fed.server_lr
    return options


def build_strategy(settings: Settings, shapes: dict[str, tuple[int, int]], writer: RunWriter
                   ) -> LoraStrategy:
    """The strategy object for these settings."""
    fed = settings.federation
    return LoraStrategy(
        state=build_global(settings, shapes), shapes=shapes, wire_dtype=fed.wire_dtype,
        writer=writer, seed=fed.seed, timeout=fed.round_timeout,
        rank_pruning=fed.hetlora_prune > 0, max_examples=fed.max_num_examples,
        max_update_norm=fed.max_update_norm,
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
        min_available_nodes=fed.min_available_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds and write everything under output-dir."""
    settings = Settings.from_config(context.run_config)
    started = time.perf_counter()
    shapes, base_id = adapted_shapes(settings)
    out_dir = Path(settings.federation.output_dir).resolve()
    writer = RunWriter(out_dir, lora_config(settings.lora, base_id),
                       {"model": settings.model.name, "base_model": base_id,
                        "settings": settings.to_config()})
    strategy = build_strategy(settings, shapes, writer)
    log(INFO, "fedlora: %s, strategy %s, global rank %d, client ranks %s, %d adapted layers, "
        "output %s", settings.model.name, settings.federation.strategy, settings.global_rank,
        ",".join(map(str, sorted(set(settings.lora.possible_ranks())))), len(shapes), out_dir)
    initial, _ = strategy.state.export()
    strategy.start(
        grid=grid, initial_arrays=to_array_record(initial, "float32"),
        num_rounds=settings.federation.num_rounds, timeout=settings.federation.round_timeout,
        train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
        evaluate_fn=strategy.end_of_round)
    state, rank = strategy.state.export()
    path = writer.write_final(state, rank)
    log(INFO, "fedlora: final adapter written to %s (%.1f s)", path, time.perf_counter() - started)
