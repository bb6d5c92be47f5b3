"""Pure math over LoRA factors; torch only, no Flower, no PEFT.

Conventions:
- one adapted layer has B (d x r) and A (r x k); `Factors` maps module name -> (B, A);
- every function works on *delta-W-scaled* factors: the LoRA scale s(r) is folded into B, so
  delta W = B @ A (`fedlora.factors` converts at the edge);
- client weights p_i = w_i / sum_j w_j, w_i = number of examples;
- computation in float64, float32 tensors out;
- dense d x k matrices are never formed (`linalg`: factored SVD, Gram-matrix norms).

The merges themselves live with their methods in `fedlora.methods`; `exactness` measures the
distance to sum_i p_i B_i A_i, `privacy` clips and noises updates and `server_opt` holds the
server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad, none).
"""

from fedlora.aggregation.base import ClientUpdate, Factors, MergeResult
from fedlora.aggregation.server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = ["SERVER_OPTIMIZERS", "ClientUpdate", "Factors", "MergeResult", "ServerOptimizer"]
