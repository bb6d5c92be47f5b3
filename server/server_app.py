"""Flower ServerApp: build the initial adapter, run the rounds, export the final adapter."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import peft_method, shared_init, target_shapes
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS, ServerOptimizer
from fedlora.checkpoint import discard_after, read_latest, set_rng_state
from fedlora.config import DefenceSettings, FederationSettings, Settings
from fedlora.factors import Factors
from fedlora.methods import Method, load
from fedlora.mixing import read_source
from fedlora.models import ModelSource, model_skeleton, resolve_source
from fedlora.outputs import RunWriter
from fedlora.runtime import node_keys, pacing
from fedlora.tracking import Tracker
from server.defences import Robust
from server.global_adapter import GlobalAdapter, rank_of
from server.privacy import PrivacyLedger
from server.rounds import RoundLoop, Rules
from server.secagg import SecAggRules
from server.server_eval import ServerEvaluator

app = ServerApp()


@dataclass
class Shapes:
    """What the clients train, read off the model's structure only (no base weights)."""

    factors: dict[str, tuple[int, int]]  # {module: (d, k)} of every LoRA-adapted layer
    dense: dict[str, tuple[int, ...]]  # {wire key: shape} of a non-LoRA method's tensors
    source: ModelSource  # where the base model is (DoRA's export reads its row norms)
    model_config: Any  # the model's Hugging Face config (of the skeleton)

    @property
    def base_id(self) -> str:
        """What adapters record as their base model."""
        return self.source.base_id


def adapted_shapes(settings: Settings) -> Shapes:
    """The shapes of what the clients train, from a meta-device skeleton of the model."""
    source = resolve_source(settings.model.name)
    peft, skeleton = peft_method(settings.lora.peft), model_skeleton(source)
    config = skeleton.config
    factors = target_shapes(skeleton, settings.lora.modules()) if peft.low_rank else {}
    return Shapes(factors, peft.dense_shapes(skeleton, settings.lora), source, config)


def server_optimizer(fed: FederationSettings) -> ServerOptimizer | None:
    """The server optimiser of these settings (lr 0 = its default), or None."""
    if fed.server_optimizer == "none":
        return None
    options: dict[str, Any] = {"momentum": fed.server_momentum, "beta2": fed.server_beta2,
                               "tau": fed.server_tau}
    if fed.server_lr > 0:
        options["lr"] = fed.server_lr
    return SERVER_OPTIMIZERS[fed.server_optimizer](**options)


def build_global(settings: Settings, method: Method, shapes: Shapes) -> GlobalAdapter:
    """The initial global adapter: seeded A (as every client draws it), B zero; a method
    without factors: its seeded initial tensors."""
    fed = settings.federation
    dense = peft_method(settings.lora.peft).initial_dense(shapes.dense, fed.seed)
    return GlobalAdapter(method=method, lora=settings.lora, dense=dense,
                         factors=shared_init(shapes.factors, settings.global_rank, fed.seed),
                         global_rank=settings.global_rank, optimizer=server_optimizer(fed),
                         # secure aggregation: the sites clip and add the noise (clients/)
                         clip_norm=0.0 if fed.secure_aggregation else fed.clip_norm,
                         noise_multiplier=0.0 if fed.secure_aggregation
                         else fed.dp_noise_multiplier,
                         noise_seed=fed.seed,
                         robust=Robust(settings.defence.robust, settings.defence.robust_f))


def initial_factors(folder: str, shapes: dict[str, tuple[int, int]], model: str) -> Factors:
    """The factors (delta-W scale) of the LoRA adapter `folder` (init-adapter), checked
    against this run's adapted layers and model."""
    source = read_source(folder)
    if (Path(folder) / "fedlora.json").exists() and source.base != model:
        raise ValueError(f"setting 'init-adapter': {folder} was trained on {source.base}, this "
                         f"run's model is {model}; start from an adapter of the same model")
    missing, extra = sorted(shapes.keys() - source.factors), sorted(source.factors - shapes.keys())
    if missing or extra:
        raise ValueError(
            f"setting 'init-adapter': {folder} adapts other layers than this run "
            f"({len(missing)} of the run's missing, e.g. {short(missing)}; {len(extra)} not in "
            f"the run, e.g. {short(extra)}); use the model and target-modules it was trained "
            f"with")
    for module, (d, k) in shapes.items():
        b, a = source.factors[module]
        if (b.shape[0], a.shape[1]) != (d, k):
            raise ValueError(f"setting 'init-adapter': {folder}'s {module} is "
                             f"{b.shape[0]}x{a.shape[1]}, this run's is {d}x{k}; start from an "
                             f"adapter of the same model")
    return source.factors


def short(names: list[str]) -> str:
    """The first of some module names, for a message."""
    return (names[0] if names else "none") + (", ..." if len(names) > 1 else "")


def rules(fed: FederationSettings, defence: DefenceSettings) -> Rules:
    """The round loop's rules from the federation and defence settings (under DP, clipping
    bounds every update, so the data-dependent norm screen is off; under secure aggregation
    the server sees no single update, so the screens are off and secagg-* bound each site)."""
    if fed.secure_aggregation:
        log(INFO, "secure-aggregation=true: the server sees only the sum of the updates; the "
            "update and weight screens (max-update-ratio, max-weight-ratio, max-share) are "
            "off, each site's contribution is bounded by secagg-clip=%g and its weight by "
            "secagg-max-weight=%d", fed.secagg_clip, fed.secagg_max_weight)
        return replace(_rules(fed, defence), max_update_ratio=0.0, max_weight_ratio=0.0,
                       max_share=1.0, secagg=SecAggRules(
                           dropout=fed.secagg_dropout, neighbours=fed.secagg_neighbours,
                           clip=fed.secagg_clip, max_weight=fed.secagg_max_weight,
                           equal_weights=defence.client_weights == "equal"
                           or fed.dp_noise_multiplier > 0,
                           noised=fed.dp_noise_multiplier > 0))
    return _rules(fed, defence)


def _rules(fed: FederationSettings, defence: DefenceSettings) -> Rules:
    return Rules(seed=fed.seed, timeout=fed.round_timeout, wire_dtype=fed.wire_dtype,
                 fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                 min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
                 min_available_nodes=fed.min_available_nodes, min_replies=fed.min_replies,
                 round_failure=fed.round_failure, round_retries=fed.round_retries,
                 max_examples=fed.max_num_examples, max_update_norm=fed.max_update_norm,
                 client_clipping=fed.clip_norm > 0 and fed.dp_clipping == "client",
                 max_update_ratio=0.0 if fed.dp_noise_multiplier else defence.max_update_ratio,
                 max_weight_ratio=defence.max_weight_ratio, max_share=defence.max_share,
                 equal_weights=defence.client_weights == "equal",
                 initial_eval=fed.initial_eval, spill_above_mb=fed.spill_above_mb)


def build_loop(settings: Settings, method: Method, shapes: Shapes, writer: RunWriter
               ) -> RoundLoop:
    """The round loop for these settings."""
    fed = settings.federation
    ledger = None
    if fed.dp_noise_multiplier:
        ledger = PrivacyLedger(fed.dp_noise_multiplier, fed.dp_delta, fed.min_available_nodes)
    return RoundLoop(build_global(settings, method, shapes), shapes.factors,
                     rules(fed, settings.defence), writer,
                     ledger=ledger, evaluator=server_evaluator(settings, method))


def server_evaluator(settings: Settings, method: Method) -> ServerEvaluator | None:
    """Server-side evaluation when server-eval > 0 (not for a personalised method: its
    nodes' models are their own)."""
    if not settings.train.server_eval:
        return None
    if method.personal:
        log(INFO, "fedlora: server-eval skipped: %s has no global model (each node keeps "
            "private factors and evaluates its own model)", method.name)
        return None
    return ServerEvaluator(settings, settings.federation.min_available_nodes)


def resume_point(loop: RoundLoop, out_dir: Path) -> int:
    """Load the last complete round's checkpoint into `loop`; the first round to run."""
    checkpoint = read_latest(out_dir)
    dropped = discard_after(out_dir, checkpoint.round)
    loop.resume(checkpoint)
    set_rng_state(checkpoint.meta["rng"], checkpoint.tensors.get("rng/torch"))
    log(INFO, "fedlora: resuming after round %d from %s (dropped %d metrics line(s) of the "
        "interrupted round)", checkpoint.round, out_dir, dropped)
    return checkpoint.round + 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds (from the last checkpoint with `resume`) and write
    everything under output-dir."""
    settings, method = load(context.run_config)
    tracker = Tracker(settings.federation.tracker)  # a missing package: an error before round 1
    pacing.pace_serverapp()
    fed = settings.federation
    started = time.perf_counter()
    shapes = adapted_shapes(settings)
    out_dir = Path(fed.output_dir).resolve()
    peft = peft_method(settings.lora.peft)
    writer = RunWriter(out_dir, peft.config(settings.lora, shapes.base_id),
                       {"model": settings.model.name, "base_model": shapes.base_id,
                        "settings": {**settings.to_config(), "resume": False}},
                       saved=lambda state: peft.saved_state(state, shapes.model_config,
                                                          shapes.source))
    loop = build_loop(settings, method, shapes, writer)
    if fed.init_adapter and not fed.resume:
        start = initial_factors(fed.init_adapter, shapes.factors, settings.model.name)
        placed = loop.state.start_from(start)
        log(INFO, "fedlora: starting from the adapter %s (rank %d, as the %s)",
            fed.init_adapter, rank_of(start), "global adapter" if placed == "factors"
            else "frozen residual under a fresh adapter")
    loop.keys = node_keys.read(out_dir)  # fedlora server: each node's registered key
    first_round = resume_point(loop, out_dir) if fed.resume else 1
    if not shapes.factors:
        log(INFO, "fedlora: %s, peft %s, strategy %s, %d trained tensors (%d values), rounds "
            "%d..%d, output %s", settings.model.name, settings.lora.peft, fed.strategy,
            len(shapes.dense), sum(math.prod(s) for s in shapes.dense.values()), first_round,
            fed.num_rounds, out_dir)
    else:
        log(INFO, "fedlora: %s, peft %s, strategy %s, global rank %d, client ranks %s, %d "
            "adapted layers, rounds %d..%d, output %s", settings.model.name,
            settings.lora.peft, fed.strategy,
            settings.global_rank, ",".join(map(str, sorted(set(settings.lora.possible_ranks())))),
            len(shapes.factors), first_round, fed.num_rounds, out_dir)
    tracker.start(out_dir.name, writer.run_info["settings"], out_dir)
    loop.tracker = tracker
    try:
        loop.run(grid, first_round, fed.num_rounds)
    finally:
        tracker.finish()
    state, rank = loop.state.export()
    path = writer.write_final(state, rank)
    log(INFO, "fedlora: final adapter written to %s (%.1f s)", path, time.perf_counter() - started)
