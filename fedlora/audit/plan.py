"""What `fedlora audit` runs (no heavy imports: `fedlora audit --help` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# arm -> the run-config settings it adds to the audit's own
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "secure-aggregation": {"secure-aggregation": True},
    "dp-sgd": {"dp-sgd": True, "dp-sgd-epsilon": 8.0},
    "secure-aggregation+dp-sgd": {"secure-aggregation": True, "dp-sgd": True,
                                  "dp-sgd-epsilon": 8.0},
}
VIEWS = ("base", "reply", "sum", "final")
SITE_FIELD = "site"


@dataclass
class AuditPlan:
    """What the audit runs: the federation, the canaries, the arms."""

    model: str = "smollm2-135m"
    dataset: str = "builtin:units"  # the default task
    sites: int = 4
    records_per_site: int = 100
    canaries: int = 1
    copies: int = 4
    digits: int = 3
    rounds: int = 1
    local_steps: int = 80
    seed: int = 0
    accuracy_examples: int = 50
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    run_config: dict[str, Any] = field(default_factory=dict)  # more settings for every arm

    def check(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"--arms: unknown {unknown}; expected some of {list(ARMS)}")
        for name, value, least in (("sites", self.sites, 2), ("records-per-site",
                                   self.records_per_site, 1), ("rounds", self.rounds, 1),
                                   ("local-steps", self.local_steps, 1),
                                   ("accuracy-examples", self.accuracy_examples, 0)):
            if value < least:
                raise ValueError(f"--{name}: expected an integer >= {least}, got {value}")


