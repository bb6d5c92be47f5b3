"""Local Flower Simulation Engine runs (see `simulations.runner`) and scenario files."""
