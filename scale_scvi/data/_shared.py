"""Location of the labeled benchmark datasets (not shipped with the package)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SCALE_SCVI_DATA"
#: Used without ``$SCALE_SCVI_DATA``, relative to the current working directory (the
#: repository root, for the tests and benchmarks run from there).
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"

FOREBRAIN = "preissl2018_forebrain_1043cells.h5ad"
CELL_LINES = "schep2017_celllines_600cells.h5ad"
SCICAR_ATAC = "scicar_mouse_kidney_atac.h5ad"
SCICAR_RNA = "scicar_mouse_kidney_rna.h5ad"


def shared_data_dir() -> Path:
    """Folder of the labeled datasets: ``$SCALE_SCVI_DATA``, else ``../shared/data`` from
    the current working directory."""
    return Path(os.environ.get(DATA_ENV, DEFAULT_DATA_DIR)).resolve()


def shared_data_path(name: str) -> Path | None:
    """Path of a labeled dataset, or ``None`` when it is not available."""
    path = shared_data_dir() / name
    return path if path.exists() else None
