"""The PEFT methods a client trains, one file each (`peft = NAME`, `fedlora.adapters.base`):
LoRA/QLoRA (`lora.py`: inject, get/set low-rank factors, export), DoRA (`dora.py`), IA3
(`ia3.py`), prompt tuning (`prompt_tuning.py`, with the prompt-first forward in
`virtual_tokens.py`), P-tuning (`p_tuning.py`; its encoder weights federated as
`prompt_encoder.py` says), prefix tuning and P-tuning v2 (`prefix_tuning.py`), bottleneck
adapters (`bottleneck.py`), LoRA experts with a router (`lora_moe.py`); the per-process model
cache (`workspace.py`); the one edge between PEFT state dicts and delta-W factors
(`fedlora.factors`)."""

# ---- the registry: one import line per PEFT method (importing a method registers it) ------
from fedlora.adapters import (  # noqa: F401
    bottleneck,
    dora,
    ia3,
    lora_moe,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
from fedlora.adapters.base import (
    PEFT_METHODS,
    PeftMethod,
    PeftOptions,
    option_keys,
    options_of,
    peft_method,
    peft_names,
    register_peft,
)
from fedlora.adapters.lora import (
    add_lora,
    check_target_modules,
    get_lora_state,
    linear_module_names,
    lora_config,
    save_adapter,
    set_lora_state,
    shared_init,
    target_names,
    target_shapes,
)
from fedlora.adapters.workspace import RESIDUAL, Slot, Workspace, set_residual
from fedlora.factors import (
    A_SUFFIX,
    B_SUFFIX,
    flatten,
    from_peft,
    module_shapes,
    shared_keys,
    to_peft,
    unflatten,
)

__all__ = ["A_SUFFIX", "B_SUFFIX", "PEFT_METHODS", "PeftMethod", "PeftOptions", "RESIDUAL", "Slot",
           "Workspace", "add_lora", "check_target_modules", "flatten", "from_peft",
           "get_lora_state", "linear_module_names", "lora_config", "module_shapes", "option_keys",
           "options_of", "peft_method", "peft_names", "register_peft", "save_adapter",
           "set_lora_state", "set_residual", "shared_init", "shared_keys", "target_names",
           "target_shapes",
           "to_peft", "unflatten"]
