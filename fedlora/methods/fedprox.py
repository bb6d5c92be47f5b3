"""FedProx: fedavg's merge, and a proximal term (mu/2)||theta - theta_global||^2 in the
clients' loss (Li et al., MLSys 2020) that keeps each client near the adapter it received.

The term itself is `proximal-mu` of the training settings (any method may use it); choosing
this method sets mu = 0.01 when `proximal-mu` is left at 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.methods.base import register
from fedlora.methods.fedavg import FedAvg

if TYPE_CHECKING:
    from fedlora.config import Settings

DEFAULT_MU = 0.01


@register
class FedProx(FedAvg):
    """fedavg's merge; clients train with the proximal term."""

    name = "fedprox"
    summary = "FedProx: fedavg plus a proximal term in the clients' loss (proximal-mu)"

    def proximal_mu(self, settings: Settings) -> float:
        """proximal-mu, or 0.01 when it is left at 0."""
        return settings.train.proximal_mu or DEFAULT_MU
