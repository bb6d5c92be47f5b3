"""Pure merging functions over per-module LoRA factors; no Flower import here.

A merge takes one `ClientUpdate` per client and returns the global factors
`{module: (B, A)}`. Strategies are chosen by name from `STRATEGIES`.
"""

from fedlora.aggregation.base import STRATEGIES, ClientUpdate, Factors, Merge, get_strategy, register
from fedlora.aggregation import fedavg  # noqa: F401  (registers "fedavg")

__all__ = ["STRATEGIES", "ClientUpdate", "Factors", "Merge", "get_strategy", "register"]
