"""LoRA adapters through PEFT: inject, get/set low-rank factors, export; per-process cache."""

from fedlora.adapters.lora import (add_lora, check_target_modules, get_lora_state, join_factors,
                                   linear_module_names, lora_config, save_adapter, set_lora_state,
                                   split_factors)
from fedlora.adapters.workspace import Slot, Workspace

__all__ = ["Slot", "Workspace", "add_lora", "check_target_modules", "get_lora_state",
           "join_factors", "linear_module_names", "lora_config", "save_adapter",
           "set_lora_state", "split_factors"]
