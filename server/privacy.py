"""Privacy budget of client-level DP, counted with Flower's own RDP accountant.

Each round that adds noise is one Gaussian release with noise multiplier z (noise std z C / m
on the mean of m updates clipped to C, `fedlora.aggregation.privacy`). The releases are
composed by `flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant` (Google's
dp-accounting underneath) under add-or-remove-one-client neighbouring datasets and *without*
amplification by sampling: the epsilon reported is an upper bound that holds whichever nodes
are sampled, also when every node takes part in every round.
"""

from __future__ import annotations

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant


class PrivacyLedger:
    """Composes one Gaussian release per noised round; reports (epsilon, delta)."""

    def __init__(self, noise_multiplier: float, delta: float, population: int) -> None:
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.population = max(1, population)
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))

    @property
    def releases(self) -> int:
        """Noised rounds composed so far."""
        return self.accountant.num_releases

    def record(self, count: int = 1) -> None:
        """Compose `count` more noised rounds."""
        if count > 0:
            event = GaussianPrivacyEvent(self.noise_multiplier, self.population, self.population)
            self.accountant.compose(event, count)

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (0 before the first release)."""
        return self.accountant.get_epsilon(self.delta) if self.releases else 0.0
