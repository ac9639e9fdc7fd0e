from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
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


def not_canonical(X, seed: int = 0) -> sp.csr_matrix:
    """The same matrix with duplicate entries (values split in two), stored zeros and
    shuffled indices in every row."""
    X = sp.csr_matrix(X)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(X.shape[0]):
        cols = X.indices[X.indptr[i] : X.indptr[i + 1]]
        vals = X.data[X.indptr[i] : X.indptr[i + 1]] / 2
        zero = np.setdiff1d(np.arange(X.shape[1]), cols)[:2]
        c = np.concatenate([cols, cols, zero])
        v = np.concatenate([vals, vals, np.zeros(len(zero), dtype=X.dtype)])
        order = rng.permutation(len(c))
        rows.append((c[order], v[order]))
    indptr = np.concatenate([[0], np.cumsum([len(c) for c, _ in rows])])
    return sp.csr_matrix(
        (np.concatenate([v for _, v in rows]), np.concatenate([c for c, _ in rows]), indptr),
        shape=X.shape,
    )
