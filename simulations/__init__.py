"""Local Flower Simulation Engine runs with full process cleanup (see `simulations.runner`)."""
