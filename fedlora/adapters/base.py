"""What a PEFT method is to fedlora: one file of `fedlora/adapters/` per method, chosen by name
(`peft = "ia3"`).

A `PeftMethod` says how a client's model gets the method's trainable tensors (`config`, one
PEFT config), which of the run's settings mean nothing to it (`unused`: refused when changed)
or belong to it alone (`owns`: every other method refuses them when changed), and what the
server starts from: LoRA-family methods (`low_rank`) are federated as low-rank factors
(`fedlora.factors`), every other method as plain tensors ("dense" tensors, keyed by PEFT's own
state-dict keys) that the server averages as they are. `dense_shapes` reads those
keys and shapes off a meta-device skeleton, so the server never loads base weights;
`initial_dense` is the seeded value every machine starts from.

Adding a method: a file here with a `@register_peft`ed subclass, plus its import line in
`fedlora/adapters/__init__.py`.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import (
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from fedlora.config import SettingsError, all_keys

if TYPE_CHECKING:
    from fedlora.config import LoraSettings, Settings
    from fedlora.models import ModelSource


# the settings of LoRA's factors: a method without factors refuses them when they are set
LORA_ONLY = ("lora-rank", "lora-alpha", "lora-dropout", "use-rslora", "client-ranks",
             "lora-plus-ratio")


class PeftMethod:
    """One parameter-efficient method; subclasses set the attributes and `config`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and the docs
    low_rank: ClassVar[bool] = False  # trains LoRA factors (rank, alpha, client-ranks apply)
    # settings that mean nothing to this method: a changed value is refused before a run
    unused: ClassVar[tuple[str, ...]] = ()
    why_unused: ClassVar[str] = ""  # "it learns rescaling vectors, not low-rank factors"
    # settings that only this method uses: every other method refuses a changed value
    owns: ClassVar[tuple[str, ...]] = ()

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PeftConfig:
        """The PEFT config of this method for these settings."""
        raise NotImplementedError

    def check_settings(self, settings: Settings) -> None:
        """Refuse settings this method has no use for (a rank for ia3) before anything runs."""
        defaults, config = all_keys(), settings.to_config()
        for key in self.unused:
            if config[key] != defaults[key][0]:
                raise SettingsError(
                    f"setting '{key}': peft={self.name} does not use it ({self.why_unused}), "
                    f"got {config[key]!r}; remove it (default {defaults[key][0]!r}) or use "
                    f"peft=lora")
        for other in PEFT_METHODS.values():
            for key in set(other.owns) - set(self.owns):
                if config[key] != defaults[key][0]:
                    raise SettingsError(
                        f"setting '{key}': only peft={other.name} uses it, but this run trains "
                        f"peft={self.name}; got {config[key]!r}: remove it (default "
                        f"{defaults[key][0]!r}) or use peft={other.name}")

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        """Wrap `model` with this method's adapter, or add one more to an existing PeftModel."""
        config = self.config(lora)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter, config)
            return model
        return get_peft_model(model, config, adapter_name=adapter)

    def get_state(self, model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
        """What a client of this method sends: PEFT's state dict of the adapter by default
        (embeddings never included), detached copies."""
        state = get_peft_model_state_dict(model, adapter_name=adapter,
                                          save_embedding_layers=False)
        return {k: v.detach().clone() for k, v in state.items()}

    def set_state(self, model: PeftModel, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Load what `get_state` returns; keys and shapes must match exactly."""
        check_state(self.get_state(model, adapter), state)
        set_peft_model_state_dict(model, state, adapter_name=adapter)

    def saved_state(self, state: dict[str, torch.Tensor], model_config: Any,
                    source: ModelSource) -> dict[str, torch.Tensor]:
        """What PEFT's saved adapter holds, given the tensors this method federates and the
        base model (its config; its files at `source`): the same by default; P-tuning saves
        the prompt its encoder computes, DoRA the magnitudes its offsets give."""
        return state

    def dense_shapes(self, skeleton: torch.nn.Module, lora: LoraSettings
                     ) -> dict[str, tuple[int, ...]]:
        """{wire key: shape} of the plain tensors a client sends (none for LoRA), read off a
        meta-device skeleton of the base model (which this call wraps in place)."""
        if self.low_rank:
            return {}
        model = get_peft_model(skeleton, self.config(lora), adapter_name="shapes")
        state = get_peft_model_state_dict(model, adapter_name="shapes",
                                          save_embedding_layers=False)
        return {k: tuple(v.shape) for k, v in sorted(state.items())}

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """The plain tensors every machine starts from (the same on every machine)."""
        if shapes:
            raise NotImplementedError(f"{self.name} has no initial value for its tensors")
        return {}


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError unless `state` has exactly the keys and shapes of `expected`."""
    if state.keys() != expected.keys():
        missing = sorted(expected.keys() - state.keys())[:3]
        extra = sorted(state.keys() - expected.keys())[:3]
        raise ValueError(f"adapter state does not match the model: missing {missing}, "
                         f"unexpected {extra}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"adapter state {key}: expected shape "
                             f"{tuple(expected[key].shape)}, got {tuple(tensor.shape)}")


PEFT_METHODS: dict[str, PeftMethod] = {}


def register_peft(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: make `cls` choosable as `peft = cls.name`."""
    if not cls.name or cls.name in PEFT_METHODS:
        raise ValueError(f"PEFT method name {cls.name!r} is empty or already registered")
    PEFT_METHODS[cls.name] = cls()
    return cls


def peft_names() -> str:
    """The registered PEFT method names, comma-separated."""
    return ", ".join(sorted(PEFT_METHODS))


def peft_method(name: str) -> PeftMethod:
    """The PEFT method called `name`; a SettingsError naming the known ones otherwise."""
    if name not in PEFT_METHODS:
        close = difflib.get_close_matches(name, PEFT_METHODS, n=1)
        raise SettingsError(f"setting 'peft': expected one of {peft_names()}, got {name!r}"
                            + (f" (did you mean '{close[0]}'?)" if close else ""))
    return PEFT_METHODS[name]

