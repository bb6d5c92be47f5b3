"""What a PEFT method is to fedlora: one file of `fedlora/adapters/` per method, chosen by name
(`peft = "ia3"`).

A `PeftMethod` says how a client's model gets the method's trainable tensors (`config`, one
PEFT config), its own run-config keys (`Options`, as PEFT's tuners own their config: every
method that does not declare a key refuses a changed value), which of the shared settings mean
nothing to it (`unused`: refused when changed), how it changes local training (`LocalHooks`:
an auxiliary loss, learning-rate scales, which parameters are a LoRA B), and what the
server starts from: LoRA-family methods (`low_rank`) are federated as low-rank factors
(`fedlora.factors`), every other method as plain tensors ("dense" tensors, keyed by PEFT's own
state-dict keys) that the server averages as they are. `dense_shapes` reads those
keys and shapes off a meta-device skeleton, so the server never loads base weights;
`initial_dense` is the seeded value every machine starts from.

Adding a method: a file here with a `@register_peft`ed subclass (and its `Options`), plus its
import line in `fedlora/adapters/__init__.py`; `tests/test_new_peft_method.py` shows it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from peft import (
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType, register_peft_method

from fedlora.config import OptionGroup, SettingsError, all_keys

if TYPE_CHECKING:
    from fedlora.config import LoraSettings, Settings
    from fedlora.models import ModelSource
    from fedlora.train.hooks import LocalTraining


# the settings of LoRA's factors: a method without factors refuses them when they are set
LORA_ONLY = ("lora-rank", "lora-alpha", "lora-dropout", "use-rslora", "client-ranks",
             "lora-plus-ratio")


@dataclass(frozen=True)
class PeftOptions(OptionGroup):
    """A PEFT method's own settings (none by default); subclasses add `setting(...)` fields
    and check them in `__post_init__`."""


OptionsT = TypeVar("OptionsT", bound=PeftOptions)


def options_of(lora: LoraSettings, kind: type[OptionsT]) -> OptionsT:
    """A PEFT method's options (`kind`, its `Options`) from `lora.options`; keys not given
    there take their defaults."""
    return kind.from_values(lora.options)


class PeftMethod:
    """One parameter-efficient method; subclasses set the attributes and `config`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and the docs
    low_rank: ClassVar[bool] = False  # trains LoRA factors (rank, alpha, client-ranks apply)
    # shared settings that mean nothing to this method: a changed value is refused before a run
    unused: ClassVar[tuple[str, ...]] = ()
    why_unused: ClassVar[str] = ""  # "it learns rescaling vectors, not low-rank factors"
    # this method's own run-config keys; every method that does not declare a key refuses it
    Options: ClassVar[type[PeftOptions]] = PeftOptions
    # name parts of its trainable B factors (`...lora_B.<adapter>...`): LoRA+ trains them at
    # lora-plus-ratio times A's rate
    b_parts: ClassVar[tuple[str, ...]] = ("lora_B",)
    # how dp-sgd gets each example's gradient (`fedlora.train.dp_sgd`): "opacus" (Opacus'
    # hooks on the adapter's modules, one pass per micro-batch), "one-by-one" (one example
    # per backward pass) or "" (refused: `why_no_dp_sgd` says why); a new method is refused
    # until tests/test_dp_sgd.py checks its per-example gradients
    dp_sgd: ClassVar[str] = ""
    why_no_dp_sgd: ClassVar[str] = ("its per-example gradients are not checked "
                                    "(tests/test_dp_sgd.py)")

    def config(self, lora: LoraSettings, base_id: str | None = None) -> PeftConfig:
        """The PEFT config of this method for these settings."""
        raise NotImplementedError

    def check_settings(self, settings: Settings) -> None:
        """Refuse settings this method has no use for (a rank for ia3) and other PEFT
        methods' options, before anything runs; check its own options' values."""
        defaults, config = all_keys(), settings.to_config()
        for key in self.unused:
            if config[key] != defaults[key][0]:
                raise SettingsError(
                    f"setting '{key}': peft={self.name} does not use it ({self.why_unused}), "
                    f"got {config[key]!r}; remove it (default {defaults[key][0]!r}) or use "
                    f"peft=lora")
        mine = self.Options.keys()
        for key, (default, _) in option_keys().items():
            if key not in mine and key in config and config[key] != default:
                users = " or ".join(f"peft={m}" for m in option_owners(key))
                raise SettingsError(
                    f"setting '{key}': peft={self.name} does not use it (an option of "
                    f"{users}), got {config[key]!r}; remove it (default {default!r}) or use "
                    f"{users}")
        self.Options.from_values(settings.lora.options)  # its own values, checked

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        """Wrap `model` with this method's adapter, or add one more to an existing PeftModel."""
        config = self.config(lora)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter, config)
            return model
        return get_peft_model(model, config, adapter_name=adapter)

    def training_hooks(self, model: torch.nn.Module, adapter: str, lora: LoraSettings,
                       hooks: LocalTraining) -> LocalTraining:
        """`hooks` with this method's part of local training filled in: its auxiliary loss,
        its learning-rate scales and the names of its B factors (`fedlora.train.hooks`)."""
        return replace(hooks, auxiliary=lambda: self.auxiliary_loss(model, adapter, lora),
                       lr_scale=lambda name: self.lr_scale(name, lora), b_parts=self.b_parts,
                       per_example=self.dp_sgd)

    def auxiliary_loss(self, model: torch.nn.Module, adapter: str, lora: LoraSettings
                       ) -> torch.Tensor | None:
        """A term the training loss adds after each forward pass (lora-moe's load balance);
        None by default."""
        return None

    def lr_scale(self, name: str, lora: LoraSettings) -> float:
        """The learning rate of parameter `name`, as a multiple of `lr` (lora-moe's router:
        moe-router-lr); 1 by default."""
        return 1.0

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


def add_peft_type(name: str) -> PeftType:
    """The member `name` (value `name`) of PEFT's `PeftType`, added if it is not there yet.

    PEFT keys all its registries by this closed enum and `register_peft_method` refuses a name
    that is not in it. `enum` has no public way to add a member, so this does what `enum` does
    when it builds one (the same private tables on Python 3.11 to 3.13), then checks that
    lookup by value, by name and as an attribute all find it.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)  # a str-valued member, built as the enum builds its own
    for attr, value in (("_name_", name), ("_value_", name), ("__objclass__", PeftType),
                        ("_sort_order_", len(PeftType._member_names_))):  # 3.12+: order
        setattr(member, attr, value)
    setattr(PeftType, name, member)  # before the member map: the enum refuses to reassign members
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    hashable = getattr(PeftType, "_hashable_values_", None)  # 3.13+: what `in` reads
    if hashable is not None:
        hashable.append(name)
    if not (PeftType(name) is PeftType[name] is getattr(PeftType, name) is member):
        raise RuntimeError(f"could not add {name!r} to peft's PeftType on this Python: expected "
                           f"lookups by value, name and attribute to find it; pin Python 3.11-3.13"
                           f" or report it with the Python version")
    return member


class LayerTuner(BaseTuner):
    """A PEFT tuner of ours: wraps each target module in `tuner_layer_cls(target, adapter,
    config)`, or adds one more adapter to a module already wrapped (subclasses set `prefix`,
    `tuner_layer_cls` and `config_cls`)."""

    config_cls: type[PeftConfig] = PeftConfig

    def checked(self, config: PeftConfig) -> Any:
        """`config`, checked to be of this tuner's config class."""
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got "
                            f"{type(config).__name__}")
        return config

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict
                                ) -> PeftConfig:
        return self.checked(peft_config)

    def _create_and_replace(self, peft_config: PeftConfig, adapter_name: str,
                            target: torch.nn.Module, target_name: str, parent: torch.nn.Module,
                            current_key: str, parameter_name: str | None = None) -> None:
        config = self.checked(peft_config)
        layer_cls: Any = self.tuner_layer_cls  # a BaseTunerLayer that is also an nn.Module
        if isinstance(target, layer_cls):  # one more adapter on an adapted layer
            target.update_layer(adapter_name, config)
            return
        new_module = layer_cls(target, adapter_name, config)
        if adapter_name not in self.active_adapters:  # an added adapter: not trainable yet
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register_tuner(name: str, config_cls: type[PeftConfig], model_cls: type[BaseTuner],
                   prefix: str) -> None:
    """Make a PEFT method of ours known to PEFT (its type added to PeftType first), once per
    process: saving and loading then go through PEFT's own API."""
    if add_peft_type(name.upper()) not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls,
                             prefix=prefix)


PEFT_METHODS: dict[str, PeftMethod] = {}


def register_peft(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: make `cls` choosable as `peft = cls.name`."""
    if not cls.name or cls.name in PEFT_METHODS:
        raise ValueError(f"PEFT method name {cls.name!r} is empty or already registered")
    for key, (default, _) in cls.Options.keys().items():
        theirs = option_keys().get(key)
        if key in all_keys() or (theirs is not None and theirs[0] != default):
            raise ValueError(f"option {key!r} of peft={cls.name} is a shared setting or is "
                             f"declared by another PEFT method with another default")
    PEFT_METHODS[cls.name] = cls()
    return cls


def option_keys() -> dict[str, tuple[Any, str]]:
    """Every PEFT method's option key with its default and help text."""
    return OptionGroup.collect(m.Options for m in PEFT_METHODS.values())


def option_owners(key: str) -> list[str]:
    """The PEFT methods that declare option `key`, sorted."""
    return sorted(n for n, m in PEFT_METHODS.items() if key in m.Options.keys())


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

