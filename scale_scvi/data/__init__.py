"""Datasets: a simulated scATAC-seq set for the demo and the tests."""

from ._simulate import simulate_scatac

__all__ = ["simulate_scatac"]
