"""Federated methods: one file each, chosen by name (`strategy = "flexlora"`).

A method owns its merge, its client-side steps, its options and its checks
(`fedlora.methods.base.Method`). Adding one is a file in this folder with a `@register`ed
`Method` subclass, plus its import line below. Entry points build settings and the
configured method with `load` (shared settings plus every method's options, validated
together); `load_settings` gives the settings alone, `method_of` the method of settings.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from fedlora.adapters import option_keys as peft_option_keys
from fedlora.config import OptionGroup, Settings, SettingsError

# ---- the registry: one import line per method (importing a method registers it) ----------
from fedlora.methods import (  # noqa: F401  # noqa: E402,F401
    fedavg,
    fedex_lora,
    fedprox,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_moe,
)
from fedlora.methods.base import (
    METHODS,
    LocalTraining,
    Method,
    MethodOptions,
    PersonalStore,
    names,
    register,
)

__all__ = ["METHODS", "LocalTraining", "Method", "MethodOptions", "PersonalStore", "compatibility",
           "get_method",
           "load", "load_settings", "method_of", "names", "option_keys", "register",
           "strategies_for"]


def strategies_for(peft: str = "lora") -> list[str]:
    """The strategies that can federate PEFT method `peft` (by default LoRA's), sorted."""
    return sorted(name for name, method in METHODS.items() if method.federates(peft))


def compatibility() -> list[dict[str, str]]:
    """One row per strategy, read off the registries' flags: the PEFT methods it federates,
    whether clients may train different ranks, the robust rules it accepts, whether
    client-level DP, secure aggregation and a server optimiser apply."""
    from fedlora.adapters import PEFT_METHODS

    yes = lambda flag: "yes" if flag else "no"
    return [{"strategy": name,
             "peft": ", ".join(p for p in sorted(PEFT_METHODS) if method.federates(p)),
             "ranks differ": yes(method.heterogeneous),
             "robust": ", ".join(sorted(method.robust_rules)) or "-",
             "dp": yes(method.linear),
             "secure-aggregation": yes(not method.secagg_refusal),
             "server-optimizer": yes(method.server_optimizer_ok)}
            for name, method in sorted(METHODS.items())]


def option_keys() -> dict[str, tuple[Any, str]]:
    """Every method option's run-config key with its default and help text."""
    return OptionGroup.collect(m.Options for m in METHODS.values())


def owners(key: str) -> list[str]:
    """The methods that declare option `key`."""
    return [n for n, m in sorted(METHODS.items()) if key in m.Options.keys()]


def get_method(name: str, **options: Any) -> Method:
    """The method called `name`, with options given by field name (defaults otherwise)."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        raise SettingsError(f"setting 'strategy': expected one of {names()}, got {name!r}"
                            + (f" (did you mean '{close[0]}'?)" if close else ""))
    cls = METHODS[name]
    try:
        return cls(cls.Options(**options))
    except TypeError as err:
        raise SettingsError(f"strategy {name!r} has options "
                            f"{sorted(cls.Options.keys()) or 'none'}: {err}") from None


def method_of(settings: Settings) -> Method:
    """The method `settings` choose, with its options, after checking the combination."""
    name = settings.federation.strategy
    if name not in METHODS:
        get_method(name)  # raises with the known names
    cls = METHODS[name]
    mine, every = cls.Options.keys(), option_keys()
    for key, value in settings.options.items():
        if key not in mine and value != every[key][0]:
            raise SettingsError(f"setting '{key}': an option of {', '.join(owners(key))}, but "
                                f"strategy is {cls.name!r}; remove it or change the strategy")
    method = cls(cls.Options.from_values(settings.options))
    method.check_settings(settings)
    return method


def load(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None
         ) -> tuple[Settings, Method]:
    """Settings from a Flower run_config (node_config taking precedence), every method's
    options included, and the method they choose; anything invalid raises here."""
    settings = Settings.from_config(run_config, node_config, options=option_keys(),
                                    peft_options=peft_option_keys())
    return settings, method_of(settings)


def load_settings(run_config: Mapping[str, Any],
                  node_config: Mapping[str, Any] | None = None) -> Settings:
    """`load`'s settings alone (validated the same way)."""
    return load(run_config, node_config)[0]
