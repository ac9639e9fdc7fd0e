"""Datasets: 10x readers (folder, .h5), simulated scATAC-seq, and the labeled sets' paths."""

from ._read import read_10x_folder, read_10x_h5
from ._shared import (
    CELL_LINES,
    FOREBRAIN,
    SCICAR_ATAC,
    SCICAR_RNA,
    shared_data_dir,
    shared_data_path,
)
from ._simulate import simulate_scatac
from ._simulate_multiome import simulate_multiome

__all__ = [
    "read_10x_folder",
    "read_10x_h5",
    "simulate_scatac",
    "simulate_multiome",
    "shared_data_dir",
    "shared_data_path",
    "FOREBRAIN",
    "CELL_LINES",
    "SCICAR_ATAC",
    "SCICAR_RNA",
]
