"""The tests' in-process federation: `simulations.inprocess` (the real ServerApp and ClientApp
over a grid in one process), under the name the tests and scripts/check_equivalence.py import."""

from simulations.inprocess import InProcessGrid as FakeGrid
from simulations.inprocess import node_contexts, run_inprocess

__all__ = ["FakeGrid", "node_contexts", "run_inprocess"]
