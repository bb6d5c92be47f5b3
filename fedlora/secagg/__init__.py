"""Secure aggregation (SecAgg+): the server learns only the sum of the sites' weighted,
quantised updates and of their weights (`protocol`: keys, shares, masks; `vector`: what a
site adds). docs/privacy-secagg.md says what it protects and what it does not."""

from fedlora.secagg.protocol import ShareRefused
from fedlora.secagg.vector import Layout, Quantizer, bits_for

__all__ = ["Layout", "Quantizer", "ShareRefused", "bits_for"]
