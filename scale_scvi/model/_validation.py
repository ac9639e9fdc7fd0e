"""Checks of user input, with errors that name the problem and the fix."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scvi import settings

from ._io import model_file_path, read_model_file

_CHUNK_ROWS = 10_000  # rows per block of a sparse matrix
_CHUNK_VALUES = 20_000_000  # values per block of a dense matrix (80 MB of float32)


def _row_blocks(matrix) -> Iterator[np.ndarray | sp.spmatrix]:
    """``matrix`` block by block of rows (scipy sparse or dense), never densified whole.

    Works for in-memory arrays and for the datasets of a backed AnnData. Dense blocks hold
    at most ``_CHUNK_VALUES`` values, whatever the number of peaks.
    """
    n_rows, n_cols = matrix.shape
    sparse = sp.issparse(matrix) or hasattr(matrix, "format")  # backed sparse datasets too
    step = _CHUNK_ROWS if sparse else max(1, min(_CHUNK_ROWS, _CHUNK_VALUES // max(1, n_cols)))
    for start in range(0, n_rows, step):
        block = matrix[start : start + step]
        yield block if sp.issparse(block) else np.asarray(block)


def validate_accessibility_matrix(
    matrix,
    what: str = "adata.X",
    warn_empty: bool = False,
    expression: bool = False,
    setup: str = "setup_anndata",
) -> None:
    """Check a cells x peaks matrix without modifying or densifying it.

    Raises a ``ValueError`` for an empty matrix or negative, NaN or infinite values and a
    ``TypeError`` for a non-numeric dtype. Any other numeric matrix is accepted: dense, CSR
    or CSC, integer, boolean or float, counts or non-integer values (the model reads any
    value > 0 as accessible).

    Parameters
    ----------
    matrix
        The matrix (in memory or a backed dataset).
    what
        How the error messages name the matrix.
    warn_empty
        Warn about cells without any accessible peak and peaks accessible in no cell. They
        are handled correctly (they carry no signal), but usually point to missed
        quality control.
    expression
        The matrix holds RNA counts (cells x genes) rather than accessibility: the messages
        say so.
    setup
        The setup method the messages name.
    """
    features, needs = (
        ("gene", "raw counts of expression")
        if expression
        else (
            "peak",
            "counts or a binary accessibility matrix (any value > 0 is read as accessible)",
        )
    )
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"{what} is empty (shape {tuple(matrix.shape)}): SCALE needs at least one cell and "
            f"one {features}."
        )
    dtype = np.dtype(getattr(matrix, "dtype", np.float32))
    if dtype.kind not in "iufb":
        raise TypeError(
            f"{what} has dtype {dtype}; SCALE needs a numeric matrix of {needs} (integer, "
            "boolean or float)."
        )
    n_empty_cells = 0
    peak_open = np.zeros(matrix.shape[1], dtype=bool)
    for block in _row_blocks(matrix):
        values = block.data if sp.issparse(block) else block
        if values.size and np.issubdtype(values.dtype, np.floating):
            if np.isnan(values).any():
                raise ValueError(
                    f"{what} contains NaN values; remove or fill them (e.g. with 0) before "
                    f"{setup}."
                )
            if np.isinf(values).any():
                raise ValueError(
                    f"{what} contains infinite values; replace them with counts before {setup}."
                )
        if values.size and values.dtype.kind in "if" and (values < 0).any():
            raise ValueError(f"{what} contains negative values; SCALE needs {needs}.")
        if warn_empty:
            positive = block > 0
            n_empty_cells += int((np.asarray(positive.sum(axis=1)).ravel() == 0).sum())
            peak_open |= np.asarray(positive.sum(axis=0)).ravel() > 0
    if not warn_empty:
        return
    n_empty_peaks = int((~peak_open).sum())
    for n, kind, other, fix in (
        (n_empty_cells, "cells", "peak", "scanpy.pp.filter_cells(adata, min_genes=1)"),
        (n_empty_peaks, "peaks", "cell", "scanpy.pp.filter_genes(adata, min_cells=1)"),
    ):
        if n:
            warnings.warn(
                f"{n} {kind} of {what} have no accessible {other}; they carry no signal. "
                f"Consider filtering them out first, e.g. with {fix}.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel + 1,
            )


def validate_unique_var_names(adata: AnnData) -> None:
    """Raise a ``ValueError`` if peak names repeat: outputs indexed by peak would be ambiguous."""
    if adata.var_names.is_unique:
        return
    duplicated = adata.var_names[adata.var_names.duplicated()].unique()
    raise ValueError(
        f"adata.var_names has {len(duplicated)} duplicated peak names (e.g. "
        f"{list(duplicated[:3])}); make them unique with adata.var_names_make_unique(), or "
        "drop the repeated peaks, before setup_anndata."
    )


def validate_obs_keys(adata: AnnData, keys: Iterable[str | None], argument: str) -> None:
    """Raise a ``ValueError`` if a covariate key is not a column of ``adata.obs``, or a clear
    error if its values are unusable (:func:`validate_covariate_values`)."""
    for key in keys:
        if key is not None and key not in adata.obs:
            raise ValueError(
                f"{argument}={key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)})."
            )
        validate_covariate_values(adata.obs, key, argument)


def validate_covariate_values(obs, key: str | None, argument: str, where: str = "adata.obs"):
    """Raise a clear error for covariate values scvi-tools would fail on, or train on badly.

    Continuous covariates (``argument`` starting with ``"continuous"``) must be numeric and
    finite: a NaN or infinite value makes the loss non-finite at the first step. The other
    covariates (batch, categorical) must have no missing value, which scvi-tools would
    report as a mismatch of categories.

    Parameters
    ----------
    obs
        The ``obs`` table holding the column.
    key
        The column (``None``: nothing to check).
    argument
        The argument that named it, e.g. ``"continuous_covariate_keys"``.
    where
        How the messages name ``obs``.
    """
    if key is None:
        return
    column = obs[key]
    if argument.startswith("continuous"):
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise TypeError(
                f"{where}[{key!r}] ({argument}) has dtype {column.dtype}; a continuous "
                "covariate must be numeric. Pass a column of categories in "
                "categorical_covariate_keys instead."
            )
        bad = ~np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan))
        kind = "NaN or infinite"
        fix = "fill them (e.g. with the column's median) or drop those cells"
    else:
        bad = column.isna().to_numpy()
        kind = "missing (NaN)"
        fix = (
            f"give them a category of their own, e.g. {where}[{key!r}] = "
            f"{where}[{key!r}].astype(str), or drop those cells"
        )
    if bad.any():
        raise ValueError(
            f"{where}[{key!r}] ({argument}) has {int(bad.sum())} {kind} values (first in cell "
            f"{obs.index[np.flatnonzero(bad)[0]]!r}); {fix} before setup."
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


def validate_count(value, name: str, minimum: int = 1, why: str = "") -> None:
    """Raise a ``TypeError`` unless ``value`` is an integer, a ``ValueError`` if below
    ``minimum``; ``why`` ends the message."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name}={value} is out of range: it must be at least {minimum}{why}.")


def validate_rate(value, name: str) -> None:
    """Raise a ``TypeError`` unless ``value`` is a real number, a ``ValueError`` unless it is
    in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        kind = type(value).__name__
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({kind}).")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")


def validate_layer_widths(widths, name: str) -> None:
    """Raise unless ``widths`` is a sequence of positive integers (hidden-layer widths)."""
    if isinstance(widths, str) or not isinstance(widths, Iterable):
        raise TypeError(f"{name} must be a sequence of layer widths, e.g. (128,), got {widths!r}.")
    for i, width in enumerate(widths):
        validate_count(width, f"{name}[{i}]", why=" (a layer needs at least one unit)")


def validate_data_split(
    train_size: float | None,
    validation_size: float | None,
    early_stopping: bool,
    external_indexing: bool = False,
) -> float:
    """Raise a ``ValueError`` for fractions of cells that leave no training (or, with early
    stopping, no validation) cells; return the fraction of cells held out for validation."""
    if train_size is not None and not 0 < train_size <= 1:
        raise ValueError(
            f"train_size={train_size} is out of range: it is the fraction of cells to train "
            "on, in (0, 1]."
        )
    if validation_size is not None and not 0 <= validation_size < 1:
        raise ValueError(
            f"validation_size={validation_size} is out of range: it is the fraction of cells "
            "to validate on, in [0, 1)."
        )
    n_validation = (
        validation_size
        if validation_size is not None
        else 1.0 - (1.0 if train_size is None else train_size)
    )
    if early_stopping and not external_indexing and n_validation <= 0:
        raise ValueError(
            "early_stopping=True stops when the validation ELBO stops improving, but no cells "
            "are held out for validation: pass train_size < 1 (e.g. train_size=0.9)."
        )
    return n_validation


def validate_saved_var_names(dir_path: str, adata, prefix: str | None = None) -> None:
    """Raise a ``ValueError`` if ``adata``'s features differ from those of a saved model.

    The saved file is read without running code from it and memory-mapped, so the check
    reads the feature names, not the weights. Nothing is checked when the file is not there
    (``load`` then reports it, or downloads it from its backup URL).

    Parameters
    ----------
    dir_path
        Folder of the saved model.
    adata
        AnnData (or MuData) the model is being loaded with.
    prefix
        Prefix of the saved file names.
    """
    path = model_file_path(dir_path, prefix)
    if not os.path.isfile(path):
        return
    saved = read_model_file(path).get("var_names")
    if saved is not None:
        validate_var_names(saved, adata, f"the model in {dir_path!r}")


def validate_var_names(expected, adata, model: str = "the model") -> None:
    """Raise a ``ValueError`` unless ``adata`` has the model's features, in the same order.

    Parameters
    ----------
    expected
        The model's peak names, or for a multimodal model a dict of feature names per
        modality.
    adata
        AnnData (or MuData) given to the model.
    model
        How the message names the model.
    """
    kind = "features" if isinstance(expected, dict) else "peaks"
    if isinstance(expected, dict):
        mods = getattr(adata, "mod", {})
        pairs = [
            (f"mdata[{m!r}]", np.asarray(names), mods[m].var_names if m in mods else None)
            for m, names in expected.items()
        ]
    else:
        pairs = [("adata", np.asarray(expected), adata.var_names)]
    for what, source, target in pairs:
        if target is None:
            raise ValueError(
                f"{model[0].upper()}{model[1:]} was trained with modality {what}, which the "
                f"data lack (modalities: {list(getattr(adata, 'mod', {}))}); use data that "
                "have it."
            )
        target = np.asarray(target)
        if source.shape == target.shape and np.array_equal(source, target):
            continue
        if source.shape == target.shape:
            differ = np.flatnonzero(source != target)
            detail = (
                f"{differ.size} of its {source.size} {kind} differ or are in another order "
                f"(first at position {differ[0]}: model {source[differ[0]]!r}, "
                f"{what} {target[differ[0]]!r})"
            )
        else:
            detail = f"the model has {source.size} {kind} and {what} has {target.size}"
        raise ValueError(
            f"{what} does not have the {kind} of {model}: {detail}. Use data on the same "
            f"{kind} in the same order (e.g. adata[:, model_{kind}]), or map new data onto "
            "the model with SCALE.prepare_query_anndata(adata, model) and "
            "SCALE.load_query_data."
        )
