from __future__ import annotations

import anndata as ad
import pytest
import scvi
import torch

from scale_scvi.data import shared_data_path, simulate_scatac

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    yield


@pytest.fixture
def small_adata():
    """A small simulated scATAC set: 200 cells x 300 peaks, 4 types."""
    return simulate_scatac(n_cells=200, n_peaks=300, n_types=4, seed=1)


def load_shared(name: str) -> ad.AnnData:
    """A labeled dataset from SCALE_SCVI_DATA (default ../shared/data), or skip."""
    path = shared_data_path(name)
    if path is None:
        pytest.skip(f"{name} not found (set SCALE_SCVI_DATA to the labeled data folder)")
    return ad.read_h5ad(path)
