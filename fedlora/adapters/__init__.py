"""LoRA adapters through PEFT: inject, get/set low-rank factors, export; per-process cache."""

from fedlora.adapters.lora import (A_SUFFIX, B_SUFFIX, add_lora, check_target_modules,
                                   get_lora_state, join_factors, linear_module_names, lora_config,
                                   module_shapes, save_adapter, set_lora_state, shared_init,
                                   shared_keys, split_factors, target_shapes)
from fedlora.adapters.workspace import RESIDUAL, Slot, Workspace, set_residual

__all__ = ["A_SUFFIX", "B_SUFFIX", "RESIDUAL", "Slot", "Workspace", "add_lora",
           "check_target_modules", "get_lora_state", "join_factors", "linear_module_names",
           "lora_config", "module_shapes", "save_adapter", "set_lora_state", "set_residual",
           "shared_init", "shared_keys", "split_factors", "target_shapes"]
