"""Plots of SCALE's outputs, in the style of :mod:`scanpy.pl`."""

from ._cluster_probabilities import cluster_probabilities
from ._cluster_specific_peaks import cluster_specific_peaks
from ._differential_accessibility import differential_accessibility, top_da_peaks
from ._training_curves import training_curves

__all__ = [
    "training_curves",
    "cluster_probabilities",
    "cluster_specific_peaks",
    "differential_accessibility",
    "top_da_peaks",
]
