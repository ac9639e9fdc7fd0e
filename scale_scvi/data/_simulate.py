"""A simulated scATAC-seq dataset with known cell types."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def simulate_scatac(
    n_cells: int = 1500,
    n_peaks: int = 6000,
    n_types: int = 6,
    specific_fraction: float = 0.08,
    density: tuple[float, float] = (0.01, 0.05),
    seed: int = 0,
) -> AnnData:
    """Simulate binary scATAC-seq counts of cells of known types.

    Every type opens its own set of type-specific peaks on top of shared background peaks;
    each cell's sequencing depth is drawn so that the fraction of open peaks per cell
    varies between ``density[0]`` and ``density[1]``.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_peaks
        Number of peaks.
    n_types
        Number of cell types (labels in ``obs["cell_type"]``).
    specific_fraction
        Fraction of all peaks that are specific to each type.
    density
        Range of the per-cell fraction of open peaks.
    seed
        Random seed.

    Returns
    -------
    AnnData with a binary ``float32`` CSR matrix in ``X``, ``obs["cell_type"]``,
    ``obs["depth"]`` (the target fraction of open peaks) and
    ``var["specific_to"]`` (the type a peak is specific to, or ``"shared"``).
    """
    if n_types < 1 or n_cells < n_types or n_peaks < n_types:
        raise ValueError("Need n_cells >= n_types >= 1 and n_peaks >= n_types.")
    lo, hi = density
    if not 0 < lo <= hi < 1:
        raise ValueError(f"density must satisfy 0 < low <= high < 1, got {density}.")
    rng = np.random.default_rng(seed)

    n_specific = max(1, int(specific_fraction * n_peaks))
    order = rng.permutation(n_peaks)
    specific_to = np.full(n_peaks, -1)
    for t in range(n_types):
        specific_to[order[t * n_specific : (t + 1) * n_specific]] = t

    # Peak propensities: log-normal background, type-specific peaks boosted in their type.
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_peaks)
    propensity = np.tile(base, (n_types, 1))
    for t in range(n_types):
        propensity[t, specific_to == t] *= 25.0
        propensity[t, (specific_to >= 0) & (specific_to != t)] *= 0.2
    propensity /= propensity.sum(1, keepdims=True)

    types = rng.integers(0, n_types, size=n_cells)
    types[:n_types] = np.arange(n_types)  # every type present
    depth = rng.uniform(lo, hi, size=n_cells)

    indptr = [0]
    indices = []
    for i in range(n_cells):
        p = np.minimum(1.0, propensity[types[i]] * depth[i] * n_peaks)
        open_peaks = np.flatnonzero(rng.random(n_peaks) < p)
        indices.append(open_peaks)
        indptr.append(indptr[-1] + open_peaks.size)
    indices = np.concatenate(indices)
    X = sp.csr_matrix(
        (np.ones(indices.size, dtype=np.float32), indices, np.asarray(indptr)),
        shape=(n_cells, n_peaks),
    )
    names = [f"type_{t}" for t in range(n_types)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([names[t] for t in types], categories=names),
            "depth": depth,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"specific_to": pd.Categorical([names[t] if t >= 0 else "shared" for t in specific_to])},
        index=[f"peak_{j}" for j in range(n_peaks)],
    )
    return AnnData(X=X, obs=obs, var=var)
