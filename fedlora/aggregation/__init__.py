"""Pure merging of LoRA factors; torch only, no Flower import.

Conventions:
- one adapted layer has B (d x r) and A (r x k); `Factors` maps module name -> (B, A);
- every function works on *delta-W-scaled* factors: the LoRA scale s(r) is folded into B, so
  delta W = B @ A (`scaling.to_delta` / `scaling.from_delta` convert at the edges);
- client weights p_i = w_i / sum_j w_j, w_i = number of examples;
- computation in float64, float32 tensors out;
- dense d x k matrices are never formed (`linalg`: factored SVD, Gram-matrix norms).

A strategy is chosen by name from `STRATEGIES` (`get_strategy("flexlora")`); its `merge`
returns a `MergeResult`. `exactness` measures the distance to sum_i p_i B_i A_i and
`SERVER_OPTIMIZERS` holds the server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad, none).
"""

from fedlora.aggregation.base import (STRATEGIES, ClientUpdate, Factors, MergeResult, Strategy,
                                      get_strategy, register)
from fedlora.aggregation import (fedavg, fedex_lora, fedsa_lora, ffa_lora, flexlora,  # noqa: F401
                                 flora, hetlora)  # importing them registers the strategies
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = ["SERVER_OPTIMIZERS", "STRATEGIES", "ClientUpdate", "Factors", "MergeResult",
           "ServerOptimizer", "Strategy", "get_strategy", "register"]
