"""Quality-control filters of cells and selection of peaks, as boolean masks."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from ._counts import cells_per_peak, peaks_per_cell
from ._docs import pp_dsp


def _check_count(value: int | None, name: str, minimum: int = 0) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer or None, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_peak_selection(
    min_cells: int | None,
    min_fraction: float | None,
    n_top: int | None,
    n_top_name: str = "n_top",
    n_min: int | None = None,
    n_min_name: str = "n_min",
    min_share: float | None = None,
    min_share_name: str = "min_share",
) -> None:
    """Raise a ``TypeError``/``ValueError`` for a peak-selection argument out of range.

    The rule of :func:`select_peaks` and of ``SCALE.setup_anndata`` (whose ``n_top`` and
    ``n_min`` are called ``n_top_peaks`` and ``n_min_peaks``, ``min_share``
    ``min_open_share``: ``n_top_name``, ``n_min_name`` and ``min_share_name`` name them in
    the messages).
    """
    _check_count(min_cells, "min_cells")
    _check_count(n_top, n_top_name, minimum=1)
    _check_count(n_min, n_min_name, minimum=1)
    if min_fraction is not None and not 0.0 <= float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be between 0 and 1 (or None), got {min_fraction}.")
    if min_share is not None:
        if isinstance(min_share, bool) or not isinstance(min_share, int | float | np.number):
            raise TypeError(
                f"{min_share_name} must be a number or None, got {type(min_share).__name__}."
            )
        if not 0.0 <= float(min_share) <= 1.0:
            raise ValueError(
                f"{min_share_name} must be between 0 and 1 (or None), got {min_share}."
            )


def peak_mask(
    counts: np.ndarray,
    n_cells: int,
    min_cells: int | None,
    min_fraction: float | None,
    n_top: int | None,
    where: str = "",
    n_min: int | None = None,
    min_share: float | None = None,
) -> np.ndarray:
    """Boolean mask of the peaks open in enough cells, at most ``n_top`` of them.

    Parameters
    ----------
    counts
        Number of cells in which each peak is open (:func:`cells_per_peak`).
    n_cells
        Number of cells they were counted on.
    min_cells, min_fraction
        Keep peaks open in at least ``max(min_cells, ceil(min_fraction * n_cells))`` cells.
    n_top
        Then keep at most this many, those open in the most cells (ties: the first peaks).
    where
        Where the arguments were given, for the error when no peak passes.
    n_min
        When fewer than this many peaks reach ``min_fraction``, lower the fraction's
        threshold to the count of the ``n_min``-th most often open peak (never below one
        cell; ``min_cells`` still applies), so that shallow data, whose peaks are each open
        in few cells, keep their most often open peaks.
    min_share
        When the peaks that reach ``min_fraction`` hold less than this share of the
        matrix's open entries (the sum of ``counts``), lower the fraction's threshold to the
        count of the last of the most often open peaks that together hold it (never below
        one cell; ``min_cells`` and ``n_top`` still apply): on shallow data a fixed fraction
        of the cells drops most of the signal.
    """
    counts = np.asarray(counts)
    by_fraction = 0 if min_fraction is None else int(np.ceil(min_fraction * n_cells))
    if n_min is not None and by_fraction > 0 and counts.size:
        rank = counts.size - min(n_min, counts.size)  # of the n_min-th most open peak
        nth = int(np.partition(counts, rank)[rank])
        by_fraction = min(by_fraction, max(nth, 1))
    if min_share is not None and by_fraction > 0 and counts.size:
        held = np.sort(counts)[::-1].astype(np.float64)
        cumulative = np.cumsum(held)
        total = cumulative[-1]
        if total > 0 and counts[counts >= by_fraction].sum() < min_share * total:
            last = min(int(np.searchsorted(cumulative, min_share * total)), held.size - 1)
            by_fraction = min(by_fraction, max(int(held[last]), 1))
    threshold = max(min_cells or 0, by_fraction)
    mask = counts >= threshold
    if not mask.any():
        raise ValueError(
            f"No peak is open in at least {threshold} cells (the most is {int(counts.max())}): "
            f"lower min_cells / min_fraction{where}."
        )
    if n_top is not None and n_top < mask.sum():
        order = np.argsort(-np.where(mask, counts, -1), kind="stable")
        mask = np.zeros_like(mask)
        mask[order[:n_top]] = True
    return mask


def _check_output(adata: AnnData, inplace: bool, copy: bool) -> None:
    if inplace and copy:
        raise ValueError("Pass inplace=True or copy=True, not both.")
    if inplace and adata.isbacked:
        raise ValueError(
            "A backed AnnData cannot be filtered in place; use the returned mask (e.g. "
            "adata[mask].to_memory()) or copy=True."
        )


def _apply(adata: AnnData, mask: np.ndarray, axis: int, inplace: bool, copy: bool):
    """Return the mask, or a filtered copy (``copy``), or filter ``adata`` (``inplace``)."""
    if copy:
        view = adata[mask] if axis == 0 else adata[:, mask]
        return view.to_memory() if adata.isbacked else view.copy()
    if inplace:
        adata._inplace_subset_obs(mask) if axis == 0 else adata._inplace_subset_var(mask)
        return None
    return mask


@pp_dsp.dedent
def filter_cells(
    adata: AnnData,
    min_peaks: int | None = 1,
    max_peaks: int | None = None,
    *,
    layer: str | None = None,
    inplace: bool = False,
    copy: bool = False,
) -> np.ndarray | AnnData | None:
    """Cells with at least ``min_peaks`` (and at most ``max_peaks``) open peaks.

    A peak is open in a cell when its value is > 0 (counts or binary data). The counts are
    computed block by block on dense, CSR, CSC or backed data; the matrix is never densified
    and ``adata`` is not modified unless ``inplace=True``.

    Parameters
    ----------
    %(adata)s
    min_peaks
        Keep cells with at least this many open peaks; ``None`` for no lower bound. The
        default drops only cells without any open peak, which carry no signal; quality
        control of real data usually asks for more (e.g. a few hundred for 10x data).
    max_peaks
        Keep cells with at most this many open peaks (e.g. to drop likely doublets);
        ``None`` (default) for no upper bound.
    %(layer)s
    %(inplace_copy)s

    Returns
    -------
    A boolean mask of the cells kept (default), the filtered copy (``copy=True``) or ``None``
    (``inplace=True``).

    Raises
    ------
    ValueError
        For negative thresholds, ``min_peaks > max_peaks``, or when no cell passes.

    Examples
    --------
    >>> cells = scale_scvi.pp.filter_cells(adata, min_peaks=200)
    >>> adata = adata[cells].copy()
    """
    _check_output(adata, inplace, copy)
    _check_count(min_peaks, "min_peaks")
    _check_count(max_peaks, "max_peaks")
    if min_peaks is not None and max_peaks is not None and min_peaks > max_peaks:
        raise ValueError(f"min_peaks={min_peaks} is larger than max_peaks={max_peaks}.")
    counts = peaks_per_cell(adata, layer)
    mask = np.ones(adata.n_obs, dtype=bool)
    if min_peaks is not None:
        mask &= counts >= min_peaks
    if max_peaks is not None:
        mask &= counts <= max_peaks
    if not mask.any():
        bounds = ((">=", "min_peaks", min_peaks), ("<=", "max_peaks", max_peaks))
        given = [(op, name, v) for op, name, v in bounds if v is not None]
        raise ValueError(
            f"No cell has {' and '.join(f'{op} {v}' for op, _, v in given)} open peaks (cells "
            f"have {int(counts.min())} to {int(counts.max())}); loosen "
            f"{' / '.join(name for _, name, _ in given)}."
        )
    return _apply(adata, mask, 0, inplace, copy)


@pp_dsp.dedent
def select_peaks(
    adata: AnnData,
    min_cells: int | None = 1,
    n_top: int | None = None,
    *,
    min_fraction: float | None = None,
    n_min: int | None = None,
    min_share: float | None = None,
    layer: str | None = None,
    cells: np.ndarray | None = None,
    inplace: bool = False,
    copy: bool = False,
) -> np.ndarray | AnnData | None:
    """Peaks open in enough cells, optionally only the ``n_top`` most often open ones.

    The number of cells in which each peak is open (value > 0) is computed block by block
    with :func:`cells_per_peak` on dense, CSR, CSC or backed data; the matrix is never
    densified and ``adata`` is not modified unless ``inplace=True``.

    Parameters
    ----------
    %(adata)s
    min_cells
        Keep peaks open in at least this many cells; ``None`` for no such bound. The default
        drops only peaks open in no cell, which carry no signal.
    n_top
        Then keep only the ``n_top`` peaks open in the most cells (ties broken by the
        peaks' order); ``None`` (default) keeps every peak that passes.
    min_fraction
        Keep peaks open in at least this fraction of the (counted) cells, in ``[0, 1]``;
        combined with ``min_cells`` when both are given.
    n_min
        When fewer than ``n_min`` peaks reach ``min_fraction``, keep the ``n_min`` peaks
        open in the most cells instead (with ties, a few more; never peaks open in no cell,
        and ``min_cells`` still applies). ``None`` (default): the fraction as given.
    min_share
        When the peaks that reach ``min_fraction`` hold less than this share (in ``[0, 1]``)
        of the open entries (cell-peak pairs with a value > 0), keep instead the most often
        open peaks that together hold it (with ties, a few more; ``min_cells`` and ``n_top``
        still apply). ``None`` (default): the fraction as given.
    %(layer)s
    %(cells)s
    %(inplace_copy)s

    Returns
    -------
    A boolean mask of the peaks kept (default), the filtered copy (``copy=True``) or ``None``
    (``inplace=True``).

    Raises
    ------
    ValueError
        For negative thresholds, ``n_top < 1`` or ``n_min < 1``, a fraction or share
        outside ``[0, 1]``, or when no peak passes.

    Examples
    --------
    >>> peaks = scale_scvi.pp.select_peaks(adata, min_cells=10, n_top=30_000)
    >>> adata = adata[:, peaks].copy()
    """
    _check_output(adata, inplace, copy)
    check_peak_selection(min_cells, min_fraction, n_top, n_min=n_min, min_share=min_share)
    counts = cells_per_peak(adata, layer, cells)
    n_cells = adata.n_obs if cells is None else int(np.count_nonzero(cells))
    mask = peak_mask(
        counts, n_cells, min_cells, min_fraction, n_top, n_min=n_min, min_share=min_share
    )
    return _apply(adata, mask, 1, inplace, copy)
