"""Local runs: scenario files (`simulations/scenarios`) and experiments
(`simulations/experiments`)."""
