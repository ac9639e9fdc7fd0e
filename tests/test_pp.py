"""Quality-control filters and peak selection (scale_scvi.pp)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scale_scvi import pp
from scale_scvi.pp import _counts


def _reference(dense: np.ndarray, rows=None):
    positive = dense > 0
    kept = positive if rows is None else positive[rows]
    return positive.sum(1), kept.sum(0)


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, size=(60, 40)).astype(np.float32)
    dense[3] = 0  # an empty cell
    dense[:, 5] = 0  # a peak open nowhere
    return dense


LAYOUTS = {
    "dense": lambda m: m,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
    "csr_array": sp.csr_array,
    "int": lambda m: sp.csr_matrix(m.astype(np.int32)),
    "bool": lambda m: m > 0,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block", [None, 7])
def test_counts_match_dense_reference_in_every_layout(counts, layout, block, monkeypatch):
    if block is not None:  # many small blocks: the block boundaries are exercised
        monkeypatch.setattr(_counts, "_BLOCK_ENTRIES", block)
        monkeypatch.setattr(_counts, "_BLOCK_VALUES", block * counts.shape[1] // 3)
    adata = ad.AnnData(LAYOUTS[layout](counts))
    rows = np.arange(counts.shape[0]) % 3 != 0
    per_cell, per_peak = _reference(counts, rows)
    np.testing.assert_array_equal(pp.peaks_per_cell(adata), per_cell)
    np.testing.assert_array_equal(pp.cells_per_peak(adata, cells=rows), per_peak)
    np.testing.assert_array_equal(pp.cells_per_peak(adata), (counts > 0).sum(0))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_counts_of_a_backed_file(counts, fmt, tmp_path, monkeypatch):
    monkeypatch.setattr(_counts, "_BLOCK_ENTRIES", 50)
    path = tmp_path / "peaks.h5ad"
    ad.AnnData(sp.csr_matrix(counts) if fmt == "csr" else sp.csc_matrix(counts)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    assert not sp.issparse(backed.X)  # a dataset on disk, read block by block
    np.testing.assert_array_equal(pp.peaks_per_cell(backed), (counts > 0).sum(1))
    np.testing.assert_array_equal(pp.cells_per_peak(backed), (counts > 0).sum(0))
    cells = pp.filter_cells(backed, min_peaks=5)
    np.testing.assert_array_equal(cells, (counts > 0).sum(1) >= 5)
    copy = pp.filter_cells(backed, min_peaks=5, copy=True)
    assert not copy.isbacked and copy.n_obs == cells.sum()
    with pytest.raises(ValueError, match="cannot be filtered in place"):
        pp.select_peaks(backed, inplace=True)
    backed.file.close()


def test_non_canonical_csr_counts_each_entry_once(counts):
    matrix = sp.csr_matrix(counts)
    # Explicit zeros, a duplicated entry and unsorted indices in row 0.
    row = matrix.indptr[0], matrix.indptr[1]
    indices = np.concatenate([matrix.indices[row[0] : row[1]][::-1], [39, 39, 38]])
    data = np.concatenate([matrix.data[row[0] : row[1]][::-1], [1.0, 1.0, 0.0]])
    rest = slice(row[1], None)
    odd = sp.csr_matrix(
        (
            np.concatenate([data, matrix.data[rest]]),
            np.concatenate([indices, matrix.indices[rest]]),
            np.concatenate([[0], matrix.indptr[1:] + 3]),
        ),
        shape=matrix.shape,
    )
    assert not odd.has_canonical_format
    before = (odd.data.copy(), odd.indices.copy())
    expected = counts.copy()
    expected[0, 39] += 2
    per_cell, per_peak = _reference(expected)
    np.testing.assert_array_equal(pp.peaks_per_cell(ad.AnnData(odd)), per_cell)
    np.testing.assert_array_equal(pp.cells_per_peak(ad.AnnData(odd)), per_peak)
    # The caller's matrix is left as it was.
    np.testing.assert_array_equal(odd.data, before[0])
    np.testing.assert_array_equal(odd.indices, before[1])


def test_filter_cells_masks_copies_and_inplace(counts):
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.layers["binary"] = sp.csr_matrix(counts > 0)
    open_per_cell = (counts > 0).sum(1)
    mask = pp.filter_cells(adata, min_peaks=10, max_peaks=14)
    np.testing.assert_array_equal(mask, (open_per_cell >= 10) & (open_per_cell <= 14))
    assert adata.n_obs == counts.shape[0]  # not modified
    np.testing.assert_array_equal(
        pp.filter_cells(adata, min_peaks=10, layer="binary"), open_per_cell >= 10
    )
    filtered = pp.filter_cells(adata, min_peaks=10, max_peaks=14, copy=True)
    assert filtered.n_obs == mask.sum() and adata.n_obs == counts.shape[0]
    assert pp.filter_cells(adata, min_peaks=1, inplace=True) is None
    assert adata.n_obs == (open_per_cell >= 1).sum()


def test_select_peaks_thresholds_and_top(counts):
    adata = ad.AnnData(sp.csc_matrix(counts))
    open_per_peak = (counts > 0).sum(0)
    np.testing.assert_array_equal(pp.select_peaks(adata, min_cells=12), open_per_peak >= 12)
    frac = pp.select_peaks(adata, min_cells=None, min_fraction=0.25)
    np.testing.assert_array_equal(frac, open_per_peak >= np.ceil(0.25 * counts.shape[0]))
    top = pp.select_peaks(adata, min_cells=1, n_top=10)
    assert top.sum() == 10
    assert open_per_peak[top].min() >= open_per_peak[~top].max()
    # Counted over a subset of cells.
    cells = pp.filter_cells(adata, min_peaks=12)
    np.testing.assert_array_equal(
        pp.select_peaks(adata, min_cells=5, cells=cells), (counts[cells] > 0).sum(0) >= 5
    )
    copy = pp.select_peaks(adata, min_cells=12, copy=True)
    assert list(copy.var_names) == list(adata.var_names[open_per_peak >= 12])
    # More peaks than pass: all that pass.
    assert pp.select_peaks(adata, min_cells=12, n_top=10_000).sum() == (open_per_peak >= 12).sum()


def test_select_peaks_floor_of_most_open_peaks(counts):
    """``n_min`` lowers only the fraction's threshold, and only when too few peaks reach it."""
    adata = ad.AnnData(sp.csr_matrix(counts))
    open_per_peak = (counts > 0).sum(0)
    n_cells = counts.shape[0]
    reach = open_per_peak >= np.ceil(0.25 * n_cells)
    assert 0 < reach.sum() < 30
    # Enough peaks reach the fraction: the floor changes nothing.
    floor = pp.select_peaks(adata, min_cells=None, min_fraction=0.25, n_min=int(reach.sum()))
    np.testing.assert_array_equal(floor, reach)
    # Too few: the n_min most often open (all peaks tied with the n_min-th).
    floor = pp.select_peaks(adata, min_cells=None, min_fraction=0.25, n_min=30)
    nth = np.sort(open_per_peak)[::-1][29]
    np.testing.assert_array_equal(floor, open_per_peak >= max(nth, 1))
    assert floor.sum() >= 30 and reach[~floor].sum() == 0
    # min_cells still applies, and a peak open in no cell is never read.
    strict = pp.select_peaks(adata, min_cells=int(nth) + 1, min_fraction=0.25, n_min=30)
    np.testing.assert_array_equal(strict, open_per_peak >= int(nth) + 1)
    every = pp.select_peaks(adata, min_cells=None, min_fraction=0.25, n_min=10**6)
    np.testing.assert_array_equal(every, open_per_peak >= 1)


def test_select_peaks_share_of_open_entries():
    """``min_share`` lowers only the fraction's threshold, and only when the peaks that reach
    it hold less than that share of the open entries: to the count of the last of the most
    open peaks that together hold it."""
    rng = np.random.default_rng(1)
    n_cells = 200
    # 30 peaks open in many cells, 300 open in 1-3 cells each: 2 % of the cells (4) keeps
    # the 30, which hold well under half of the open entries.
    common = rng.binomial(1, 0.08, size=(n_cells, 30))
    rare = np.zeros((n_cells, 300))
    for j in range(300):
        rare[rng.choice(n_cells, 1 + j % 3, replace=False), j] = 1
    adata = ad.AnnData(sp.csr_matrix(np.hstack([common, rare]).astype(np.float32)))
    open_per_peak = np.asarray((adata.X > 0).sum(0)).ravel()
    reach = open_per_peak >= 4
    total = open_per_peak.sum()
    assert open_per_peak[reach].sum() < 0.5 * total
    plain = pp.select_peaks(adata, min_cells=None, min_fraction=0.02)
    np.testing.assert_array_equal(plain, reach)
    held = np.sort(open_per_peak)[::-1]
    for share in (0.5, 0.7, 0.9):
        last = held[np.searchsorted(np.cumsum(held), share * total)]
        mask = pp.select_peaks(adata, min_cells=None, min_fraction=0.02, min_share=share)
        np.testing.assert_array_equal(mask, open_per_peak >= last)
        assert open_per_peak[mask].sum() >= share * total
        assert reach[~mask].sum() == 0
    # Where the peaks that reach the fraction hold the share, nothing changes.
    small = pp.select_peaks(adata, min_cells=None, min_fraction=0.02, min_share=0.3)
    np.testing.assert_array_equal(small, reach)
    # min_cells and n_top still apply.
    strict = pp.select_peaks(adata, min_cells=3, min_fraction=0.02, min_share=0.9)
    np.testing.assert_array_equal(strict, open_per_peak >= 3)
    capped = pp.select_peaks(adata, min_cells=None, min_fraction=0.02, min_share=0.9, n_top=50)
    assert capped.sum() == 50 and reach[~capped].sum() == 0


BAD = [
    (pp.filter_cells, {"min_peaks": -1}, ValueError, "min_peaks must be >= 0"),
    (pp.filter_cells, {"min_peaks": 2.5}, TypeError, "min_peaks must be an integer"),
    (pp.filter_cells, {"min_peaks": 10, "max_peaks": 5}, ValueError, "larger than max_peaks"),
    (pp.filter_cells, {"min_peaks": 10_000}, ValueError, "No cell has >= 10000 open peaks"),
    (pp.filter_cells, {"layer": "counts"}, ValueError, "Layer 'counts' is not in"),
    (pp.filter_cells, {"inplace": True, "copy": True}, ValueError, "not both"),
    (pp.select_peaks, {"inplace": True, "copy": True}, ValueError, "not both"),
    (pp.select_peaks, {"min_cells": 10_000}, ValueError, "No peak is open in at least 10000"),
    (pp.select_peaks, {"n_top": 0}, ValueError, "n_top must be >= 1"),
    (pp.select_peaks, {"n_min": 0}, ValueError, "n_min must be >= 1"),
    (pp.select_peaks, {"min_fraction": 1.5}, ValueError, "between 0 and 1"),
    (pp.select_peaks, {"min_share": -0.1}, ValueError, "min_share must be between 0 and 1"),
    (pp.select_peaks, {"min_share": "0.7"}, TypeError, "min_share must be a number"),
    (pp.select_peaks, {"cells": np.ones(3, bool)}, ValueError, "boolean mask of length 60"),
]


@pytest.mark.parametrize(("function", "kwargs", "error", "message"), BAD)
def test_bad_arguments_raise_clear_errors(counts, function, kwargs, error, message):
    with pytest.raises(error, match=message):
        function(ad.AnnData(sp.csr_matrix(counts)), **kwargs)


@pytest.mark.parametrize(("value", "message"), [(-1.0, "negative values"), (np.nan, "NaN values")])
def test_bad_values_are_refused(counts, value, message):
    for matrix in (counts.copy(), sp.csr_matrix(counts)):
        (matrix.data if sp.issparse(matrix) else matrix.ravel())[0] = value
        with pytest.raises(ValueError, match=message):
            pp.peaks_per_cell(ad.AnnData(matrix))


def test_not_an_anndata():
    with pytest.raises(TypeError, match="Expected an AnnData"):
        pp.peaks_per_cell(np.zeros((2, 2)))
