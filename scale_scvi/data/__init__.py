"""Datasets: a simulated scATAC-seq set for the demo and tests, and the labeled sets' paths."""

from ._shared import (
    CELL_LINES,
    FOREBRAIN,
    SCICAR_ATAC,
    SCICAR_RNA,
    shared_data_dir,
    shared_data_path,
)
from ._simulate import simulate_scatac

__all__ = [
    "simulate_scatac",
    "shared_data_dir",
    "shared_data_path",
    "FOREBRAIN",
    "CELL_LINES",
    "SCICAR_ATAC",
    "SCICAR_RNA",
]
