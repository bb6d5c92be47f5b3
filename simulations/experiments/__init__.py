"""Experiments that compare federated training with its baselines (see docs/results.md)."""
