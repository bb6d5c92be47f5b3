"""Record-level differential privacy in local training (`dp-sgd`): DP-SGD at every site.

With dp-sgd on, one optimizer step of `fedlora.train.train_local` is:

1. a Poisson sample of the site's training examples: each one is in the step's logical batch
   independently with probability q = batch-size x grad-accum / n (n: the site's training
   examples), the sampling the accountant assumes; the logical batch is run in micro-batches
   of at most batch-size examples (so memory stays that of one micro-batch, and gradient
   accumulation is this split, whatever the sample's size);
2. per-example gradients of the trainable parameters (Opacus' `GradSampleHooks` on the
   adapter's modules: the frozen base, 4-bit or not, gets no hooks), each example's loss
   being the mean next-token loss over its own response tokens, so that no example's
   gradient depends on another's (objective=dpo: an example is a preference pair, its loss
   the pair's DPO loss against reference scores of that pair alone, its gradient the sum of
   its chosen and rejected rows');
3. each example's gradient, all trainable parameters together, clipped to L2 norm
   dp-sgd-clip = C (`clip_per_example`), summed over the logical batch;
4. Gaussian noise N(0, (sigma C)^2) on every coordinate of the sum (`add_noise`, from a
   generator seeded by the operating system, never by the run's seed, which the server
   knows), divided by the expected batch size q n = batch-size x grad-accum.

The optimizer (AdamW) only post-processes that noisy gradient. FedProx's proximal term does
not depend on the data: its gradient is added after the noise.

The accountant is the site's own (`DpSgdPlan`): the Poisson subsampled Gaussian mechanism at
rate q and noise multiplier sigma, composed over every step the site trains in the run
(local-steps x num-server-rounds), under add-or-remove-one-record neighbouring datasets; its
epsilon is the smaller of Opacus' PRV and RDP bounds (`epsilon_of`). Given no
dp-sgd-noise-multiplier, sigma is the smallest one whose whole run fits dp-sgd-epsilon at
dp-sgd-delta (`noise_for`); given one, a run whose planned epsilon is above dp-sgd-epsilon is
refused (`plan_dp_sgd`).

Which PEFT methods it covers is each method's `dp_sgd` (`fedlora.adapters.base`); see
docs/dp-sgd.md.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fedlora.adapters.virtual_tokens import prompted, runner
from fedlora.config import SettingsError, TrainSettings
from fedlora.data import IGNORE, collate
from fedlora.train.loss import CHUNK_TOKENS, decoder_and_head

SIGMA_TOLERANCE = 1e-3  # relative width at which the noise search stops


@functools.cache
def epsilon_of(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` of `steps` Poisson-subsampled Gaussian steps: the smaller of two
    upper bounds, Opacus' PRV accountant's (Gopi, Lee, Wutschitz 2021: the privacy curve
    composed numerically, its upper estimate) and its RDP accountant's (Mironov 2017;
    Mironov, Talwar, Zhang 2019), which stands alone where the PRV computation fails;
    infinite without noise, 0 for no steps."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return min(prv_epsilon(noise_multiplier, sample_rate, steps, delta),
               rdp_epsilon(noise_multiplier, sample_rate, steps, delta))


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float
                ) -> float:
    """Opacus' RDP bound: an upper bound that always computes, looser than PRV's."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": still a bound
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def prv_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float
                ) -> float:
    """Opacus' PRV bound (the upper end of its estimate, at its default error of 0.01);
    infinite where its discretisation fails or gives what no bound can be (a negative or
    non-finite epsilon), as it does far from the usual regime (opacus #601, #585)."""
    import numpy as np
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            epsilon = float(accountant.get_epsilon(delta))
    except (RuntimeError, ValueError, ArithmeticError):
        return math.inf
    return epsilon if 0 <= epsilon < math.inf else math.inf


@functools.cache  # a search over the accountant: seconds, once per run and node
def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to SIGMA_TOLERANCE) whose `steps` steps at
    `sample_rate` spend at most `target_epsilon` at `delta` by `epsilon_of`: a bisection
    below the RDP accountant's own multiplier (Opacus' `get_noise_multiplier`), which fits."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        high = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant="rdp"))
    low = high / 2
    while low > 1e-3 and epsilon_of(low, sample_rate, steps, delta) <= target_epsilon:
        high, low = low, low / 2
    while high - low > SIGMA_TOLERANCE * high:
        middle = (low + high) / 2
        if epsilon_of(middle, sample_rate, steps, delta) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class DpSgdPlan:
    """One site's DP-SGD over a whole run: clip C, noise multiplier sigma, Poisson rate q,
    the expected logical batch, the run's planned steps and its delta."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    expected_batch: int  # batch-size x grad-accum = q x n
    steps: int  # local-steps x num-server-rounds
    delta: float
    target_epsilon: float  # dp-sgd-epsilon: the budget the run must fit

    @property
    def planned_epsilon(self) -> float:
        """Epsilon of the whole run, every planned step taken."""
        return self.epsilon(self.steps)

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after `steps` steps of this plan."""
        return epsilon_of(self.noise_multiplier, self.sample_rate, steps, self.delta)

    def noise_to_signal(self, entries: int) -> float:
        """The norm of one step's noise on the mean gradient, sigma C sqrt(entries) / the
        expected batch, in units of C: the mean of the clipped gradients has a norm of at
        most C, so above about 10 the noise swamps what a step learns."""
        return self.noise_multiplier * math.sqrt(entries) / self.expected_batch


NOISY = 10.0  # noise_to_signal above which a node warns that its run will learn little


def noise_warning(plan: DpSgdPlan, entries: int) -> str | None:
    """The warning for a plan whose noise swamps what it learns (None when it does not)."""
    ratio = plan.noise_to_signal(entries)
    if ratio <= NOISY:
        return None
    return (f"dp-sgd: each step's noise has about {ratio:.0f}x the norm of what the step "
            f"learns at most (noise multiplier {plan.noise_multiplier:.3g}, expected batch "
            f"{plan.expected_batch}, {entries:,} trained entries), so this run will learn "
            f"little; train with larger batches (grad-accum) and fewer trained entries "
            f"(target-modules, lora-rank): docs/dp-sgd.md, 'Settings that learn'")


def plan_dp_sgd(train: TrainSettings, num_rounds: int, num_examples: int) -> DpSgdPlan:
    """The DP-SGD plan of a site with `num_examples` training examples over `num_rounds`
    rounds of `train.local_steps` steps; raises a SettingsError when the run cannot fit
    dp-sgd-epsilon (a given noise multiplier spends more, or the site has fewer examples than
    one expected batch)."""
    expected = train.batch_size * train.grad_accum
    if num_examples < expected:
        raise SettingsError(
            f"setting 'dp-sgd': a step samples each example with probability batch-size x "
            f"grad-accum / examples = {expected}/{num_examples} > 1 on this node; lower "
            f"batch-size or grad-accum to at most {num_examples} examples per step")
    rate, steps = expected / num_examples, train.local_steps * num_rounds
    sigma = train.dp_sgd_noise_multiplier or noise_for(
        train.dp_sgd_epsilon, train.dp_sgd_delta, rate, steps)
    plan = DpSgdPlan(clip=train.dp_sgd_clip, noise_multiplier=sigma, sample_rate=rate,
                     expected_batch=expected, steps=steps, delta=train.dp_sgd_delta,
                     target_epsilon=train.dp_sgd_epsilon)
    spent = plan.planned_epsilon
    if spent > train.dp_sgd_epsilon:
        raise SettingsError(
            f"setting 'dp-sgd-epsilon': this run would spend epsilon {spent:.4g} at delta "
            f"{train.dp_sgd_delta:g} on this node (dp-sgd-noise-multiplier={sigma:g}, "
            f"{steps} steps = local-steps {train.local_steps} x num-server-rounds "
            f"{num_rounds}, sample rate {rate:.4g}), above its budget dp-sgd-epsilon="
            f"{train.dp_sgd_epsilon:g}; raise dp-sgd-noise-multiplier, or set it to 0 to "
            f"derive one that fits, or train fewer steps")
    return plan


# ---- the mechanism: pure functions ------------------------------------------------------
def clip_per_example(grad_samples: list[torch.Tensor], clip: float
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(sum over examples of each example's gradient clipped to L2 norm `clip`, all
    parameters together; each example's norm before clipping). `grad_samples[k]` holds
    parameter k's per-example gradients, examples along dimension 0."""
    flat = [g.reshape(g.shape[0], -1).float() for g in grad_samples]
    norms = torch.cat(flat, dim=1).norm(dim=1) if flat else torch.zeros(0)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("n,n...->...", factor, g.float()) for g in grad_samples], norms


def add_noise(summed: list[torch.Tensor], std: float, generator: torch.Generator
              ) -> list[torch.Tensor]:
    """Each tensor plus independent N(0, std^2) noise per coordinate."""
    if std == 0:
        return [s.clone() for s in summed]
    return [s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
            for s in summed]


def poisson_sample(num_examples: int, rate: float, generator: torch.Generator) -> list[int]:
    """The indices of one Poisson sample: each example in independently with prob `rate`."""
    draws = torch.rand(num_examples, generator=generator)
    return [int(i) for i in torch.nonzero(draws < rate).flatten()]


def secret_generator() -> torch.Generator:
    """A CPU generator seeded by the operating system: noise and sampling nobody can
    replay."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


def _token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                  ) -> torch.Tensor:
    """fp32 cross-entropy of each position of one chunk."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Each example's mean next-token loss over its own response tokens (0 for one with
    none), shape (batch,): `fedlora.train.loss.response_loss` per example."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    counts = keep.sum(dim=1)
    owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    parts = decoder_and_head(model)
    if parts is None:  # the model's own logits
        inputs, skip = prompted(model, batch["input_ids"], batch["attention_mask"])
        logits = runner(model)(**inputs).logits[:, skip:]
        per_token = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep],
                                    reduction="none")
    else:
        decoder, head = parts
        inputs, skip = prompted(model, batch["input_ids"], batch["attention_mask"])
        hidden = decoder(**inputs).last_hidden_state[:, skip:]
        chosen, wanted = hidden[:, :-1][keep], targets[keep]
        # recompute the head's chunks in the backward pass, unless the head itself trains
        # (then `PerExampleGradients.take` refuses it: it sees tokens, not examples)
        frozen = not any(p.requires_grad for p in head.parameters())
        pieces = []
        for start in range(0, chosen.shape[0], chunk_tokens):
            h, y = chosen[start:start + chunk_tokens], wanted[start:start + chunk_tokens]
            pieces.append(checkpoint(_token_losses, head, h, y, use_reentrant=False)
                          if frozen else _token_losses(head, h, y))
        per_token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        if not pieces:
            return hidden.sum(dim=(1, 2)).float() * 0.0
    sums = per_token.new_zeros(labels.shape[0]).index_add(0, owner, per_token)
    return sums / counts.clamp(min=1)


class PerExampleGradients:
    """Per-example gradients of `params` while in a `with` block: with `how` = "opacus",
    Opacus' hooks on the trainable modules of `model`, one backward pass of a summed loss
    per micro-batch; with "one-by-one", a backward pass per example (`micro_batch` is then 1:
    for methods whose trainable modules Opacus cannot hook or that compute one output for
    the whole batch). `take()` gives each parameter's per-example gradients of the last
    backward pass and clears them."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 how: str = "opacus") -> None:
        if how not in ("opacus", "one-by-one"):
            raise ValueError(f"dp-sgd: per-example gradients by 'opacus' or 'one-by-one', "
                             f"got {how!r}")
        self.model, self.params, self.how = model, params, how
        self.hooks: Any = None

    def micro_batch(self, batch_size: int) -> int:
        """Examples per backward pass: batch-size, or 1 one by one."""
        return batch_size if self.how == "opacus" else 1

    def __enter__(self) -> PerExampleGradients:
        if self.how == "opacus":
            from opacus.grad_sample import GradSampleHooks

            self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum",
                                         strict=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hooks is not None:
            self.hooks.remove_hooks()
            self.hooks = None
        for p in self.params:
            for name in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, name):
                    delattr(p, name)
        for module in self.model.modules():
            for name in ("activations", "max_batch_len"):
                if name in module.__dict__:
                    delattr(module, name)

    def take(self, batch_size: int, rows: int = 1) -> list[torch.Tensor]:
        """Each parameter's per-example gradients (batch_size, *shape) of the last backward
        pass (zeros for a parameter it did not reach); raises when a parameter got a
        gradient but no per-example one. With `rows` > 1 an example is that many rows of the
        forward pass, laid out row block by row block (`collate_pairs`: the chosen rows, then
        the rejected ones), and its gradient is the sum of its rows'."""
        out = []
        for p in self.params:
            if self.how == "one-by-one":
                gs = None if p.grad is None else p.grad.detach().unsqueeze(0)
            else:
                gs = getattr(p, "grad_sample", None)
                if isinstance(gs, list):  # a module run more than once per pass
                    raise RuntimeError("dp-sgd: a trainable module ran more than once in one "
                                       "forward pass; its per-example gradients are not "
                                       "defined")
                if gs is None and p.grad is not None:
                    raise RuntimeError(
                        f"dp-sgd: a parameter of shape {tuple(p.shape)} got a gradient but no "
                        f"per-example one (Opacus has no hook on its module); mark the PEFT "
                        f"method dp_sgd = 'one-by-one'")
                p.grad_sample = None  # type: ignore[attr-defined]
                if gs is not None and gs.shape[0] != batch_size * rows:
                    raise RuntimeError(
                        f"dp-sgd: a parameter of shape {tuple(p.shape)} got {gs.shape[0]} "
                        f"per-row gradients for {batch_size * rows} rows: its module does "
                        f"not see the examples along its first dimension (an adapted LM "
                        f"head sees tokens); leave it out of target-modules")
                if gs is not None and rows > 1:
                    gs = gs.reshape(rows, batch_size, *gs.shape[1:]).sum(dim=0)
            out.append(gs if gs is not None else p.new_zeros((batch_size, *p.shape)))
            p.grad = None
        return out


def private_step(model: torch.nn.Module, params: list[torch.nn.Parameter],
                 examples: list[dict], pad_id: int, plan: DpSgdPlan, micro_batch: int,
                 generator: torch.Generator, grads: PerExampleGradients,
                 autocast: Callable[[], Any], on_batch: Callable[[list[dict]], None] | None
                 = None, auxiliary: Callable[[], torch.Tensor | None] | None = None,
                 unit_losses: Callable[[torch.nn.Module, list[dict]],
                                       tuple[torch.Tensor, int, int]] | None = None
                 ) -> tuple[float, int, int]:
    """One DP-SGD step: a Poisson sample of `examples`, per-example gradients clipped to
    `plan.clip`, summed, noised and divided by the expected batch; sets each parameter's
    `.grad`. `on_batch` is called with each micro-batch before its forward pass; a PEFT
    method's `auxiliary` loss term (a batch statistic, which clipping cannot bound) is
    refused. `unit_losses` replaces the per-sequence loss when an example is more than one
    sequence (objective=dpo: a pair, `LocalTraining.unit_losses`); a pair's gradient, clipped
    as one, is then the sum of its rows'. Returns (mean loss over the sampled examples, NaN
    if none; tokens; examples)."""
    device = params[0].device
    chosen = poisson_sample(len(examples), plan.sample_rate, generator)
    summed = [torch.zeros(p.shape, device=device, dtype=torch.float32) for p in params]
    loss_sum, tokens = 0.0, 0
    for p in params:
        p.grad = None
    for micro in _chunks([examples[i] for i in chosen], grads.micro_batch(micro_batch)):
        if on_batch is not None:
            on_batch(micro)
        with autocast():
            if unit_losses is not None:
                losses, rows, fed = unit_losses(model, micro)
            else:
                batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                losses, rows, fed = example_losses(model, batch), 1, int(
                    batch["attention_mask"].sum())
        tokens += fed
        if auxiliary is not None and auxiliary() is not None:
            raise ValueError("dp-sgd: the PEFT method adds a loss term over the whole "
                             "micro-batch, which per-example clipping does not bound")
        with warnings.catch_warnings():  # the first hooked module's input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        loss_sum += float(losses.detach().sum())
        clipped, _ = clip_per_example(grads.take(len(micro), rows), plan.clip)
        summed = [s + c.to(device) for s, c in zip(summed, clipped)]
    noisy = add_noise(summed, plan.noise_multiplier * plan.clip, generator)
    for p, g in zip(params, noisy):
        p.grad = (g / plan.expected_batch).to(p.dtype)
    return (loss_sum / len(chosen) if chosen else math.nan), tokens, len(chosen)


def _chunks(items: list[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
