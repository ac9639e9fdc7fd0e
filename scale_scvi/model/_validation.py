"""Checks of user input, with errors that name the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

_CHUNK = 10_000


def _row_chunks(matrix) -> Iterator[np.ndarray]:
    """Values of ``matrix`` chunk by chunk of rows, without densifying it whole."""
    n = matrix.shape[0]
    for start in range(0, n, _CHUNK):
        block = matrix[start : start + _CHUNK]
        if sp.issparse(block):
            yield np.asarray(block.data)
        elif hasattr(block, "data") and hasattr(block, "indptr"):  # backed sparse dataset
            yield np.asarray(block.data)
        else:
            yield np.asarray(block)


def get_matrix(adata: AnnData, layer: str | None):
    """The matrix ``setup_anndata`` will register, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None: put the peak counts in adata.X or name a `layer`.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(
            f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers)}); "
            "pass one of those, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def validate_accessibility_matrix(matrix, what: str = "adata.X") -> None:
    """Raise a ``ValueError`` for an empty matrix or negative, NaN or infinite values."""
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"{what} is empty (shape {tuple(matrix.shape)}): SCALE needs at least one cell and "
            "one peak."
        )
    dtype = getattr(matrix, "dtype", None)
    if dtype is not None and not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise TypeError(f"{what} has dtype {dtype}; SCALE needs a numeric (counts) matrix.")
    for values in _row_chunks(matrix):
        if values.size == 0:
            continue
        if np.issubdtype(values.dtype, np.floating):
            if np.isnan(values).any():
                raise ValueError(
                    f"{what} contains NaN values; remove or fill them (e.g. with 0) before "
                    "setup_anndata."
                )
            if np.isinf(values).any():
                raise ValueError(
                    f"{what} contains infinite values; replace them with counts before "
                    "setup_anndata."
                )
        if (values < 0).any():
            raise ValueError(
                f"{what} contains negative values; SCALE needs counts or a binary "
                "accessibility matrix (any value > 0 is read as accessible)."
            )


def validate_obs_keys(adata: AnnData, keys: Iterable[str | None], argument: str) -> None:
    """Raise a ``ValueError`` if a covariate key is not a column of ``adata.obs``."""
    for key in keys:
        if key is not None and key not in adata.obs:
            raise ValueError(
                f"{argument}={key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)})."
            )


def validate_n_centroids(n_centroids: int, n_obs: int) -> None:
    """Raise a ``ValueError`` unless ``1 <= n_centroids <= n_obs``."""
    if isinstance(n_centroids, bool) or not isinstance(n_centroids, int | np.integer):
        raise TypeError(f"n_centroids must be an integer, got {type(n_centroids).__name__}.")
    if n_centroids < 1 or n_centroids > n_obs:
        raise ValueError(
            f"n_centroids={n_centroids} is out of range: it must be between 1 and the number "
            f"of cells ({n_obs})."
        )
