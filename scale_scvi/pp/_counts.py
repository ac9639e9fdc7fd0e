"""Open-peak counts of a cells x peaks matrix, computed block by block."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ._docs import pp_dsp

_BLOCK_ENTRIES = 20_000_000  # stored values per block (about 160 MB of float32 data + indices)
_BLOCK_VALUES = 20_000_000  # values per block of a dense matrix (80 MB of float32)


def get_matrix(adata: AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error when it is missing."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"Expected an AnnData, got {type(adata).__name__}; for RNA + ATAC data pass the "
            "ATAC modality, e.g. mdata.mod['atac']."
        )
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


def _sparse_format(matrix) -> str | None:
    """``"csr"``, ``"csc"`` (scipy or a backed AnnData dataset) or ``None`` for dense."""
    if sp.issparse(matrix):
        return matrix.format if matrix.format in ("csr", "csc") else "csr"
    fmt = getattr(matrix, "format", None)  # anndata's backed sparse datasets
    return fmt if fmt in ("csr", "csc") else None


def _check_values(values: np.ndarray, what: str) -> None:
    if values.dtype.kind not in "iufb":
        raise TypeError(
            f"{what} has dtype {values.dtype}; a numeric matrix of counts or of 0/1 "
            "accessibility is needed."
        )
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise ValueError(f"{what} contains NaN values; remove or fill them (e.g. with 0) first.")
    if values.dtype.kind in "if" and values.size and values.min() < 0:
        raise ValueError(
            f"{what} contains negative values; counts or a binary accessibility matrix are "
            "needed (any value > 0 is read as open)."
        )


def _compressed_blocks(matrix, fmt: str) -> Iterator[tuple[int, int, sp.spmatrix]]:
    """``(start, stop, block)`` along the compressed axis (rows of CSR, columns of CSC).

    Each block is canonical (sorted, duplicates summed): a duplicated entry counts once.
    """
    n_major = matrix.shape[0] if fmt == "csr" else matrix.shape[1]
    nnz = getattr(matrix, "nnz", None)
    if nnz is None:  # a backed dataset: its index pointer gives the entries per row
        nnz = int(matrix.group["indptr"][-1]) if hasattr(matrix, "group") else 0
    per_major = max(1.0, nnz / max(1, n_major))
    step = max(1, int(_BLOCK_ENTRIES // per_major))
    for start in range(0, n_major, step):
        stop = min(n_major, start + step)
        block = matrix[start:stop] if fmt == "csr" else matrix[:, start:stop]
        block = sp.csr_matrix(block) if fmt == "csr" else sp.csc_matrix(block)
        if not block.has_canonical_format:
            block = block.copy()  # slices may share the caller's arrays
            block.sum_duplicates()
        yield start, stop, block


def count_open(
    matrix, rows: np.ndarray | None = None, what: str = "the matrix"
) -> tuple[np.ndarray, np.ndarray]:
    """Open (> 0) entries per row and per column, without densifying ``matrix``.

    Parameters
    ----------
    matrix
        Cells x features: numpy array, scipy CSR / CSC, or a backed AnnData dataset.
    rows
        Boolean mask of the rows counted in the per-column counts (default: all rows).
    what
        How error messages name the matrix.

    Returns
    -------
    ``(per_row, per_column)``: int64 counts of open entries in each row (over all columns)
    and in each column (over the ``rows`` kept).
    """
    n_rows, n_cols = matrix.shape
    if rows is not None:
        rows = np.asarray(rows, dtype=bool)
        if rows.shape != (n_rows,):
            raise ValueError(f"rows must be a boolean mask of length {n_rows}, got {rows.shape}.")
    per_row = np.zeros(n_rows, dtype=np.int64)
    per_col = np.zeros(n_cols, dtype=np.int64)
    fmt = _sparse_format(matrix)
    if fmt is None:
        step = max(1, _BLOCK_VALUES // max(1, n_cols))
        for start in range(0, n_rows, step):
            block = np.asarray(matrix[start : start + step])
            _check_values(block, what)
            positive = block > 0
            per_row[start : start + len(block)] = positive.sum(1)
            kept = positive if rows is None else positive[rows[start : start + len(block)]]
            per_col += kept.sum(0)
        return per_row, per_col
    for start, stop, block in _compressed_blocks(matrix, fmt):
        _check_values(block.data, what)
        positive = block.data > 0
        major = np.repeat(np.arange(start, stop), np.diff(block.indptr))
        if fmt == "csr":
            per_row[start:stop] = np.bincount(
                major - start, weights=positive, minlength=stop - start
            ).astype(np.int64)
            keep = positive if rows is None else positive & rows[major]
            per_col += np.bincount(block.indices[keep], minlength=n_cols)
        else:
            per_row += np.bincount(block.indices[positive], minlength=n_rows)
            keep = positive if rows is None else positive & rows[block.indices]
            per_col[start:stop] = np.bincount(major[keep] - start, minlength=stop - start).astype(
                np.int64
            )
    return per_row, per_col


@pp_dsp.dedent
def peaks_per_cell(adata: AnnData, layer: str | None = None) -> np.ndarray:
    """Number of open peaks (entries > 0) in each cell.

    Computed block by block on dense, CSR, CSC or backed data; never densifies the matrix.

    Parameters
    ----------
    %(adata)s
    %(layer)s

    Returns
    -------
    int64 array of length ``adata.n_obs``.
    """
    return _count_open_in(adata, layer)[0]


@pp_dsp.dedent
def cells_per_peak(
    adata: AnnData, layer: str | None = None, cells: np.ndarray | None = None
) -> np.ndarray:
    """Number of cells in which each peak (or any feature, e.g. a gene) is open (> 0).

    The statistic behind :func:`select_peaks`, for reuse: computed block by block on dense,
    CSR, CSC or backed data, never densifying the matrix; explicit zeros are not counted and
    duplicated entries count once.

    Parameters
    ----------
    %(adata)s
    %(layer)s
    %(cells)s

    Returns
    -------
    int64 array of length ``adata.n_vars``.
    """
    return _count_open_in(adata, layer, cells)[1]


def _count_open_in(
    adata: AnnData, layer: str | None, cells: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`count_open` of ``adata.X`` or of the layer, its errors naming that matrix."""
    return count_open(get_matrix(adata, layer), rows=cells, what=matrix_name(layer))


def matrix_name(layer: str | None) -> str:
    """How error messages name the matrix of ``adata``: ``adata.X`` or its layer."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"
