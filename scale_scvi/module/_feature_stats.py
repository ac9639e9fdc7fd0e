"""Per-feature statistics of a registered matrix, computed block by block of rows."""

from __future__ import annotations

import numpy as np


def open_fraction(matrix, chunk: int = 10_000) -> np.ndarray:
    """Fraction of cells in which each peak is open (> 0)."""
    counts = np.zeros(matrix.shape[1])
    for start in range(0, matrix.shape[0], chunk):
        block = matrix[start : start + chunk]
        counts += np.asarray((block > 0).sum(0)).ravel()
    return counts / matrix.shape[0]


def mean_proportion(matrix, chunk: int = 10_000) -> np.ndarray:
    """Each gene's share of all counts (the average expression profile)."""
    totals = np.zeros(matrix.shape[1])
    for start in range(0, matrix.shape[0], chunk):
        totals += np.asarray(matrix[start : start + chunk].sum(0), dtype=np.float64).ravel()
    return totals / max(totals.sum(), 1.0)
