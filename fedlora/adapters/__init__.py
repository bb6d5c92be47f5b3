"""LoRA adapters through PEFT: inject, get/set low-rank factors, export; per-process cache;
the one edge between PEFT state dicts and delta-W factors (`fedlora.factors`)."""

from fedlora.adapters.lora import (
                                      add_lora,
                                      check_target_modules,
                                      get_lora_state,
                                      linear_module_names,
                                      lora_config,
                                      save_adapter,
                                      set_lora_state,
                                      shared_init,
                                      target_shapes,
)
from fedlora.adapters.workspace import RESIDUAL, Slot, Workspace, set_residual
from fedlora.factors import (
                                      A_SUFFIX,
                                      B_SUFFIX,
                                      flatten,
                                      from_peft,
                                      lora_scale,
                                      module_shapes,
                                      shared_keys,
                                      to_peft,
                                      unflatten,
)

__all__ = ["A_SUFFIX", "B_SUFFIX", "RESIDUAL", "Slot", "Workspace", "add_lora",
           "check_target_modules", "flatten", "from_peft", "get_lora_state", "linear_module_names",
           "lora_config", "lora_scale", "module_shapes", "save_adapter", "set_lora_state",
           "set_residual", "shared_init", "shared_keys", "target_shapes", "to_peft", "unflatten"]
