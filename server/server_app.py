"""Flower ServerApp: build the initial adapter, run the rounds, export the final adapter."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import lora_config, shared_init, target_shapes
from fedlora.aggregation import get_strategy
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS
from fedlora.config import Settings
from fedlora.models import model_skeleton, resolve_source
from fedlora.outputs import RunWriter
from server.checkpoint import discard_after, read_latest, set_rng_state
from server.global_adapter import GlobalAdapter
from server.privacy import PrivacyLedger
from server.server_eval import ServerEvaluator
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
                         residual_budget=fed.residual_rank, optimizer=optimizer,
                         clip_norm=fed.clip_norm, noise_multiplier=fed.dp_noise_multiplier,
                         noise_seed=fed.seed)


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
    ledger = None
    if fed.dp_noise_multiplier:
        ledger = PrivacyLedger(fed.dp_noise_multiplier, fed.dp_delta, fed.min_available_nodes)
    return LoraStrategy(
        state=build_global(settings, shapes), shapes=shapes, wire_dtype=fed.wire_dtype,
        writer=writer, seed=fed.seed, timeout=fed.round_timeout,
        rank_pruning=fed.hetlora_prune > 0, max_examples=fed.max_num_examples,
        max_update_norm=fed.max_update_norm, min_replies=fed.min_replies,
        round_failure=fed.round_failure, round_retries=fed.round_retries,
        client_clipping=fed.clip_norm > 0 and fed.dp_clipping == "client", ledger=ledger,
        evaluator=server_evaluator(settings),
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
        min_available_nodes=fed.min_available_nodes)


def server_evaluator(settings: Settings) -> ServerEvaluator | None:
    """Server-side evaluation when server-eval > 0 (not for fedsa-lora: B is per client)."""
    if not settings.train.server_eval:
        return None
    if get_strategy(settings.federation.strategy).shares == "A":
        log(INFO, "fedlora: server-eval skipped: fedsa-lora has no global B; each node "
            "evaluates its own model")
        return None
    return ServerEvaluator(settings, settings.federation.min_available_nodes)


def resume_point(strategy: LoraStrategy, out_dir: Path) -> int:
    """Load the last complete round's checkpoint into `strategy`; the first round to run."""
    checkpoint = read_latest(out_dir)
    dropped = discard_after(out_dir, checkpoint.round)
    strategy.resume(checkpoint)
    set_rng_state(checkpoint.meta["rng"], checkpoint.tensors.get("rng/torch"))
    log(INFO, "fedlora: resuming after round %d from %s (dropped %d metrics line(s) of the "
        "interrupted round)", checkpoint.round, out_dir, dropped)
    return checkpoint.round + 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds (from the last checkpoint with `resume`) and write
    everything under output-dir."""
    settings = Settings.from_config(context.run_config)
    fed = settings.federation
    started = time.perf_counter()
    shapes, base_id = adapted_shapes(settings)
    out_dir = Path(fed.output_dir).resolve()
    writer = RunWriter(out_dir, lora_config(settings.lora, base_id),
                       {"model": settings.model.name, "base_model": base_id,
                        "settings": {**settings.to_config(), "resume": False}})
    strategy = build_strategy(settings, shapes, writer)
    first_round = resume_point(strategy, out_dir) if fed.resume else 1
    log(INFO, "fedlora: %s, strategy %s, global rank %d, client ranks %s, %d adapted layers, "
        "rounds %d..%d, output %s", settings.model.name, fed.strategy, settings.global_rank,
        ",".join(map(str, sorted(set(settings.lora.possible_ranks())))), len(shapes),
        first_round, fed.num_rounds, out_dir)
    strategy.run(grid, first_round, fed.num_rounds)
    state, rank = strategy.state.export()
    path = writer.write_final(state, rank)
    log(INFO, "fedlora: final adapter written to %s (%.1f s)", path, time.perf_counter() - started)
