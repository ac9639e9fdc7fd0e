"""A simulated paired RNA + ATAC (multiome) dataset with known cell types."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData

from ._simulate import simulate_scatac


def simulate_multiome(
    n_cells: int = 1000,
    n_peaks: int = 3000,
    n_genes: int = 1000,
    n_types: int = 6,
    missing_atac: float = 0.0,
    missing_rna: float = 0.0,
    library_size: tuple[float, float] = (500.0, 3000.0),
    dispersion: float = 5.0,
    seed: int = 0,
) -> MuData:
    """Simulate paired scATAC-seq and scRNA-seq of cells of known types.

    The ATAC side is :func:`~scale_scvi.data.simulate_scatac`; the RNA side draws negative
    binomial counts whose gene proportions depend on the cell type (each type up-regulates
    its own marker genes) and whose library size is uniform in ``library_size``.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_peaks
        Number of peaks.
    n_genes
        Number of genes.
    n_types
        Number of cell types (labels in ``obs["cell_type"]`` of the MuData and both
        modalities).
    missing_atac, missing_rna
        Fractions of cells (disjoint sets) whose ATAC, respectively RNA, profile is missing:
        their row in that modality is all zeros, and ``obs["modality"]`` says ``"rna"``,
        respectively ``"atac"`` (the modality they have); other cells are ``"paired"``.
    library_size
        Range of the RNA library sizes.
    dispersion
        Inverse dispersion ``theta`` of the negative binomial.
    seed
        Random seed.

    Returns
    -------
    MuData with modalities ``"atac"`` (binary ``float32`` CSR) and ``"rna"`` (counts,
    ``float32`` CSR) of the same cells in the same order; ``obs["cell_type"]`` and
    ``obs["modality"]`` are columns of the MuData's ``obs``.
    """
    if not (0 <= missing_atac and 0 <= missing_rna and missing_atac + missing_rna < 1):
        raise ValueError(
            "missing_atac and missing_rna must be >= 0 with a sum below 1, got "
            f"{missing_atac} and {missing_rna}."
        )
    if n_genes < n_types:
        raise ValueError(f"Need n_genes >= n_types, got {n_genes} < {n_types}.")
    atac = simulate_scatac(n_cells=n_cells, n_peaks=n_peaks, n_types=n_types, seed=seed)
    rng = np.random.default_rng(seed + 1)
    types = atac.obs["cell_type"].cat.codes.to_numpy()

    n_markers = max(1, n_genes // (4 * n_types))
    order = rng.permutation(n_genes)
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)
    proportions = np.tile(base, (n_types, 1))
    for t in range(n_types):
        proportions[t, order[t * n_markers : (t + 1) * n_markers]] *= 20.0
    proportions /= proportions.sum(1, keepdims=True)
    library = rng.uniform(*library_size, size=n_cells)
    mu = proportions[types] * library[:, None]
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)

    n_no_atac = int(round(missing_atac * n_cells))
    n_no_rna = int(round(missing_rna * n_cells))
    # cells that lose their RNA keep some ATAC signal, so every cell has data
    has_peaks = np.diff(atac.X.indptr) > 0
    chosen = rng.permutation(np.flatnonzero(has_peaks))
    if n_no_rna > chosen.size:
        raise ValueError(f"missing_rna={missing_rna} exceeds the cells with open peaks.")
    no_rna = chosen[:n_no_rna]
    rest = np.setdiff1d(np.arange(n_cells), no_rna)
    no_atac = rng.choice(rest, size=n_no_atac, replace=False)
    modality = np.full(n_cells, "paired", dtype=object)
    modality[no_atac] = "rna"
    modality[no_rna] = "atac"
    counts[no_rna] = 0.0
    x_atac = atac.X.tolil()
    x_atac[no_atac] = 0.0
    x_atac = sp.csr_matrix(x_atac, dtype=np.float32)
    x_atac.eliminate_zeros()

    obs = atac.obs[["cell_type"]].copy()
    obs["modality"] = pd.Categorical(modality, categories=["paired", "atac", "rna"])
    rna = AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=obs.index),
        var=pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)]),
    )
    atac = AnnData(X=x_atac, obs=pd.DataFrame(index=obs.index), var=atac.var)
    mdata = MuData({"atac": atac, "rna": rna})
    mdata.obs["cell_type"] = obs["cell_type"]
    mdata.obs["modality"] = obs["modality"]
    return mdata
