"""The local training loop of one client for one round: read it top to bottom."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fedlora.config import TrainSettings
from fedlora.data import collate
from fedlora.models.quantization import paged_adamw_8bit
from fedlora.train.distributed import DataParallel, labelled_tokens
from fedlora.train.dp_sgd import (
    DpSgdPlan,
    PerExampleGradients,
    plan_dp_sgd,
    private_step,
    secret_generator,
)
from fedlora.train.hooks import LocalTraining
from fedlora.train.loss import response_loss
from fedlora.train.progress import StepProgress
from fedlora.train.schedule import lr_factor


@dataclass(frozen=True)
class RoundPlan:
    """Where this round of local training stands in the run: its place in the learning-rate
    schedule (round `server_round` of `num_rounds`) and the seed of its draws."""

    server_round: int = 1
    num_rounds: int = 1
    seed: int = 0


PLAIN = LocalTraining()
T = TypeVar("T")


@dataclass
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean loss over the round's optimizer steps
    first_loss: float
    last_loss: float
    steps: int
    tokens: int  # tokens fed to the model (prompt + response, no padding)
    seconds: float
    dp_sgd: DpSgdPlan | None = None  # dp-sgd: the plan each step followed
    step_losses: list[float] = field(default_factory=list)  # each optimizer step's loss


def trainable_parameters(model: torch.nn.Module, adapter: str,
                         keep: Callable[[str], bool] | None = None) -> list[torch.nn.Parameter]:
    """The active adapter's parameters (PEFT names them with the adapter as one part of
    the path: `...lora_A.<adapter>.weight`, `...ia3_l.<adapter>`), those `keep` accepts when
    given (a client training only some experts); everything else stays frozen, a frozen
    residual adapter included."""
    params = []
    for name, p in model.named_parameters():
        mine = adapter in name.split(".") and (keep is None or keep(name))
        p.requires_grad_(mine)
        if mine:
            params.append(p)
    if not params:
        raise RuntimeError(f"adapter {adapter!r} has no trainable parameters")
    return params


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter],
                 lora_plus_ratio: float, hooks: LocalTraining = PLAIN) -> list[dict]:
    """Optimizer groups, each with its `lr_scale` (times the scheduled lr): one group, or with
    LoRA+ the B factors (`hooks.is_b`) apart at `lora_plus_ratio` times A's learning rate;
    the PEFT method's `hooks.scale(name)` multiplies a parameter's scale (a router's own)."""
    names = {id(p): name for name, p in model.named_parameters()}
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        name = names[id(p)]
        scale = lora_plus_ratio if hooks.is_b(name) else 1.0
        scale *= hooks.scale(name)
        by_scale.setdefault(scale, []).append(p)
    return [{"params": group, "lr_scale": scale} for scale, group in by_scale.items()]


def make_optimizer(groups: list[dict] | list[torch.nn.Parameter], settings: TrainSettings,
                   device: str) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW on CUDA, over `param_groups` (or a plain
    list of parameters)."""
    if settings.optimizer == "paged-adamw-8bit":
        return paged_adamw_8bit(groups, settings.lr, settings.weight_decay, device)
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def batches(examples: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless seeded shuffled micro-batches; a new permutation each pass over the data."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def train_local(model: torch.nn.Module, adapter: str, examples: list[dict], pad_id: int,
                settings: TrainSettings, plan: RoundPlan = RoundPlan(),
                hooks: LocalTraining = PLAIN, desc: str = "train",
                parallel: DataParallel | None = None) -> TrainResult:
    """Train the active adapter for `settings.local_steps` optimizer steps and report losses.

    `plan` places the round in the run's learning-rate schedule and seeds its draws; `hooks`
    says what the federated and the PEFT method change (`fedlora.train.hooks`): with
    `hooks.proximal_mu` > 0 (FedProx) the loss gets (mu/2) ||theta - theta_start||^2 over the
    adapter's parameters, theta_start being the global adapter this round started from;
    `hooks.auxiliary()`, called after each forward pass, gives a term to add to the loss, or
    None (the reported losses are the language-model loss alone); `hooks.keep` limits the
    parameters that train; `hooks.on_batch` is called with each micro-batch's examples before
    its forward pass (they may carry fields beyond the tokens, which collate ignores);
    `hooks.examples`, when given, replace `examples`.

    With `parallel` this process is one of a node's data-parallel group
    (`fedlora.train.distributed`): it trains its slice of each micro-batch, its loss the
    slice's share of the micro-batch mean, and the step's gradients are summed over the
    group before the optimizer steps; the reported losses and tokens are the group's.

    With `settings.dp_sgd` each step is a DP-SGD step instead (`fedlora.train.dp_sgd`): a
    Poisson sample of expected size batch-size x grad-accum, run in micro-batches of at most
    batch-size, per-example gradients clipped, summed and noised; a step's loss is the mean
    over the examples it sampled (a step that sampled none repeats the previous step's, 0
    for the first).
    """
    examples = hooks.examples or examples
    if not examples:
        raise ValueError("this client has no training examples")
    device = next(model.parameters()).device
    torch.manual_seed(plan.seed + (parallel.rank if parallel else 0))  # LoRA dropout draws
    params = trainable_parameters(model, adapter, hooks.keep)
    optimizer = make_optimizer(param_groups(model, params, settings.lora_plus_ratio, hooks),
                               settings, device.type)
    mu = hooks.proximal_mu
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    stream = batches(examples, settings.batch_size, plan.seed)
    model.train()
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    progress = StepProgress(settings.local_steps, desc)
    if settings.dp_sgd:
        if parallel is not None:
            raise ValueError("dp-sgd trains in one process: run the node with --devices 1")
        dp = plan_dp_sgd(settings, plan.num_rounds, len(examples))
        with PerExampleGradients(model, params, hooks.per_example) as grads:
            tokens = _private_steps(model, params, optimizer, examples, pad_id, settings,
                                    plan, hooks, anchor, dp, grads, losses, progress)
        return _finish(model, progress, losses, tokens, start, dp)
    for i in range(settings.local_steps):
        schedule_lr(optimizer, settings, plan, i)
        # ---- gradient accumulation: grad_accum micro-batches make one optimizer step ----
        step_loss, step_tokens = 0.0, 0
        for _ in range(settings.grad_accum):
            examples_now = next(stream)
            if parallel is not None:  # this process's slice; the loss over the whole batch's
                whole = (hooks.units or labelled_tokens)(examples_now)  # labelled tokens
                examples_now = parallel.mine(examples_now)
                if not examples_now:
                    continue
            if hooks.on_batch is not None:  # e.g. routing each example to its own expert
                hooks.on_batch(examples_now)
            step_tokens += fed_tokens(examples_now)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                if hooks.batch_loss is not None:  # another objective (DPO's pairs)
                    loss, count = hooks.batch_loss(model, examples_now)
                else:  # response tokens only (-100: prompt, pad), LM head in chunks (loss.py)
                    batch = {k: v.to(device) for k, v in collate(examples_now, pad_id).items()}
                    loss, count = response_loss(model, batch)
            if parallel is not None:  # this slice's share of the whole batch's mean loss
                if not count:
                    continue
                loss = loss * (count / whole)
            plain_loss = loss.item()
            extra = hooks.auxiliary() if hooks.auxiliary is not None else None
            if extra is not None and parallel is not None:
                raise ValueError("an auxiliary loss term (lora-moe's balance) is not a sum "
                                 "over examples: train it with --devices 1")
            if extra is not None:  # e.g. the experts' load balance, from this forward pass
                loss = loss + extra
            if anchor and parallel is None:
                # FedProx: stay near the global adapter this round started from
                loss = loss + mu / 2 * sum(((p - p0) ** 2).sum()
                                                    for p, p0 in zip(params, anchor))
            (loss / settings.grad_accum).backward()
            step_loss += plain_loss / settings.grad_accum
        if anchor and parallel is not None and parallel.rank == 0:  # FedProx, once per group
            proximal = torch.stack([((p - p0) ** 2).sum() for p, p0 in zip(params, anchor)])
            (mu / 2 * proximal.sum()).backward()
        if parallel is not None:  # the group's gradients, loss and tokens, summed
            step_loss, group_tokens = parallel.sync(params, step_loss, step_tokens)
            step_tokens = int(group_tokens)
        tokens += step_tokens
        optimizer_step(params, optimizer, settings)
        losses.append(step_loss)
        progress.update(step_loss)
    return _finish(model, progress, losses, tokens, start)


def fed_tokens(examples: list[dict]) -> int:
    """Tokens a micro-batch feeds the model (no padding; both responses of a pair)."""
    return sum(len(e["input_ids"]) + len(e.get("rejected_input_ids", ())) for e in examples)


def schedule_lr(optimizer: torch.optim.Optimizer, settings: TrainSettings, plan: RoundPlan,
                i: int) -> None:
    """Every parameter group's learning rate for step `i` of this round. The schedule spans
    the whole run: round r continues where round r-1 stopped."""
    total_steps = plan.num_rounds * settings.local_steps
    step = (plan.server_round - 1) * settings.local_steps + i
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * group["lr_scale"] * lr_factor(
            step, total_steps, settings.warmup_steps, settings.lr_schedule)


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   settings: TrainSettings) -> None:
    """Clip the gradients to max-grad-norm (when set), step, and clear them."""
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _finish(model: torch.nn.Module, progress: StepProgress, losses: list[float], tokens: int,
            start: float, dp: DpSgdPlan | None = None) -> TrainResult:
    """Close the round's progress bar, put the model back in eval mode, sum up the round."""
    progress.close()
    model.eval()
    return TrainResult(loss=sum(losses) / len(losses), first_loss=losses[0],
                       last_loss=losses[-1], steps=len(losses), tokens=tokens,
                       seconds=time.perf_counter() - start, dp_sgd=dp,
                       step_losses=list(losses))


def _private_steps(model: torch.nn.Module, params: list[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer, examples: list[dict], pad_id: int,
                   settings: TrainSettings, plan: RoundPlan, hooks: LocalTraining,
                   anchor: list[torch.Tensor], dp: DpSgdPlan, grads: PerExampleGradients,
                   losses: list[float], progress: StepProgress) -> int:
    """`train_local`'s steps under dp-sgd (`fedlora.train.dp_sgd.private_step`), each
    step's loss appended to `losses`; the data-independent FedProx gradient (towards
    `anchor`, the adapter the round started from) is added after the noise. Returns the
    tokens fed to the model."""
    device = params[0].device
    generator = secret_generator()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                      enabled=settings.bf16)
    fed = 0
    for i in range(settings.local_steps):
        schedule_lr(optimizer, settings, plan, i)
        loss, tokens, _ = private_step(model, params, examples, pad_id, dp,
                                       settings.batch_size, generator, grads, autocast,
                                       hooks.on_batch, hooks.auxiliary, hooks.unit_losses)
        fed += tokens
        for p, p0 in zip(params, anchor):  # FedProx: mu (theta - theta_start)
            assert p.grad is not None
            p.grad += hooks.proximal_mu * (p.detach() - p0)
        optimizer_step(params, optimizer, settings)  # clipping: post-processing of the noise
        step_loss = loss if loss == loss else (losses[-1] if losses else 0.0)
        losses.append(step_loss)
        progress.update(step_loss)
    return fed
