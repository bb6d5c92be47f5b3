"""What changes one client's local training, in one object (`LocalTraining`).

Plain training (`LocalTraining()`) trains every parameter of the active adapter on the
client's examples with the language-model loss. The federated method (`fedlora.methods`:
`Method.local_training`) and the PEFT method (`fedlora.adapters`: `PeftMethod.training_hooks`)
each fill in their part before `fedlora.train.train_local` runs:

- the federated method: which parameters train (`keep`), other examples (`examples`), a
  call before each micro-batch (`on_batch`), FedProx's proximal term (`proximal_mu`) and
  figures for the reply (`metrics`);
- the PEFT method: a term added to the loss (`auxiliary`), each parameter's learning rate as a
  multiple of lr (`lr_scale`), which parameters are a LoRA B (`b_parts`, for LoRA+) and how
  dp-sgd gets its per-example gradients (`per_example`);
- the objective (`fedlora.train.preference` for objective=dpo): the loss of a micro-batch in
  place of the language-model loss (`batch_loss`), what its mean is over (`units`) and
  dp-sgd's unit of privacy when it is not one sequence (`unit_losses`: a pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LocalTraining:
    """How one client's local training differs from plain training."""

    # ---- from the federated method ----
    keep: Callable[[str], bool] | None = None  # the adapter parameters that train (None: all)
    examples: list[dict] | None = None  # the examples to train on instead (with extra fields)
    on_batch: Callable[[list[dict]], None] | None = None  # before each micro-batch's forward
    metrics: dict[str, Any] = field(default_factory=dict)  # added to the client's reply
    proximal_mu: float = 0.0  # FedProx: (mu/2)||theta - theta_start||^2 added to the loss
    # ---- from the PEFT method ----
    auxiliary: Callable[[], torch.Tensor | None] | None = None  # after each forward pass
    lr_scale: Callable[[str], float] | None = None  # a parameter's lr, as a multiple of lr
    b_parts: tuple[str, ...] = ("lora_B",)  # name parts of the B factors (LoRA+ rate)
    per_example: str = "opacus"  # dp-sgd: "opacus" hooks, or "one-by-one" backward passes
    # ---- from the objective ----
    # (model, micro-batch examples) -> (the batch's mean loss, the units it is a mean over);
    # None: the language-model loss over the response tokens
    batch_loss: Callable[[torch.nn.Module, list[dict]], tuple[torch.Tensor, int]] | None = None
    units: Callable[[list[dict]], int] | None = None  # a micro-batch's units (data parallel)
    # dp-sgd's unit instead of one tokenized example (DPO: a pair): (model, micro-batch) ->
    # (each unit's loss, rows of the forward pass per unit, tokens fed)
    unit_losses: Callable[[torch.nn.Module, list[dict]], tuple[torch.Tensor, int, int]] | None \
        = None

    def is_b(self, name: str) -> bool:
        """Is parameter `name` a B factor (trained at lora-plus-ratio times A's rate)?"""
        return any(f".{part}." in name for part in self.b_parts)

    def scale(self, name: str) -> float:
        """The PEFT method's learning-rate multiple for parameter `name` (1 by default)."""
        return self.lr_scale(name) if self.lr_scale is not None else 1.0
