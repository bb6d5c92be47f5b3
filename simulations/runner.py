"""Local multi-client simulations on Flower's Simulation Engine (Ray), with full cleanup.

The process handling lives in `fedlora.launch`; this module is the simulation's entry point.
"""

from fedlora.launch import TAG_ENV_VAR, SimulationSetupError, run_simulation

__all__ = ["TAG_ENV_VAR", "SimulationSetupError", "run_simulation"]
