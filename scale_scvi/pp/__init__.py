"""Preprocessing: quality control of cells and selection of peaks.

Each function computes its counts block by block on dense, CSR, CSC or backed data (the
matrix is never densified) and returns a boolean mask, unless asked for a filtered copy
(``copy=True``) or to filter in place (``inplace=True``).
"""

from ._counts import cells_per_peak, peaks_per_cell
from ._filter import filter_cells, select_peaks

__all__ = ["filter_cells", "select_peaks", "peaks_per_cell", "cells_per_peak"]
