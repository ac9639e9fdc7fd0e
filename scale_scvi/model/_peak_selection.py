"""The peaks a model reads: chosen once from the registered matrix, recorded in the registry."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scvi.data.fields import LayerField, MuDataWrapper

from scale_scvi.pp import cells_per_peak
from scale_scvi.pp._filter import check_peak_selection, peak_mask

#: Default selection of :meth:`~scale_scvi.SCALE.setup_anndata`: peaks open in at least
#: 1 % of the cells, at most the 50,000 most often open ones, and on shallow data, where the
#: peaks that reach 1 % are fewer than 10,000 or hold less than 60 % of the matrix's open
#: entries, the most often open ones down to whichever of the two asks for more.
MIN_FRACTION = 0.01
N_TOP_PEAKS = 50_000
N_MIN_PEAKS = 10_000
MIN_OPEN_SHARE = 0.6

SELECTED_PEAKS_KEY = "selected_peaks"
N_SELECTED_KEY = "n_selected_peaks"
#: Mean number of cells in which the selected peaks are open, in the data the model was set up
#: on (read by the default decoder weight decay of ``SCALE.train``).
OPEN_CELLS_KEY = "mean_open_cells_per_selected_peak"


def check_setup_selection(
    min_cells: int | None,
    min_fraction: float | None,
    n_top_peaks: int | None,
    n_min_peaks: int | None,
    min_open_share: float | None = None,
) -> None:
    """``check_peak_selection`` with the names of the setup methods' arguments."""
    check_peak_selection(
        min_cells,
        min_fraction,
        n_top_peaks,
        n_top_name="n_top_peaks",
        n_min=n_min_peaks,
        n_min_name="n_min_peaks",
        min_share=min_open_share,
        min_share_name="min_open_share",
    )


class PeakLayerField(LayerField):
    """The peak matrix, with the peaks the model reads chosen at registration.

    The whole matrix is registered (and loaded, minibatch by minibatch) as by
    :class:`~scvi.data.fields.LayerField`; the indices of the selected peaks go into the
    field's state registry, which is saved with a model and transferred as it is to data
    registered later from it (``load``, ``load_query_data``, any ``get_*`` on new data),
    so that every later use reads the same peaks. The count of cells per peak is
    :func:`scale_scvi.pp.cells_per_peak` (block by block, on dense, CSR, CSC or backed
    data, never densified).

    Parameters
    ----------
    registry_key, layer
        As in :class:`~scvi.data.fields.LayerField`.
    min_cells, min_fraction, n_top_peaks, n_min_peaks, min_open_share
        Keep the peaks open in at least ``max(min_cells, ceil(min_fraction * n_cells))``
        cells, then at most ``n_top_peaks`` of them, those open in the most cells (ties: the
        first peaks); when fewer than ``n_min_peaks`` reach ``min_fraction``, the
        ``n_min_peaks`` most often open, and when those that reach it hold less than
        ``min_open_share`` of the open entries, the most often open ones that hold it; all
        ``None``: every peak. The rule of :func:`scale_scvi.pp.select_peaks` (``n_top``,
        ``n_min``, ``min_share``).
    setup
        The setup method, named in error messages.
    """

    def __init__(
        self,
        registry_key: str,
        layer: str | None,
        min_cells: int | None = None,
        min_fraction: float | None = MIN_FRACTION,
        n_top_peaks: int | None = N_TOP_PEAKS,
        setup: str = "setup_anndata",
        n_min_peaks: int | None = N_MIN_PEAKS,
        min_open_share: float | None = MIN_OPEN_SHARE,
    ):
        super().__init__(registry_key, layer, is_count_data=False)
        self.setup = setup
        check_setup_selection(min_cells, min_fraction, n_top_peaks, n_min_peaks, min_open_share)
        self.min_cells = min_cells
        self.min_fraction = min_fraction
        self.n_top_peaks = n_top_peaks
        self.n_min_peaks = n_min_peaks
        self.min_open_share = min_open_share

    def register_field(self, adata: AnnData) -> dict:
        state = super().register_field(adata)
        open_cells = cells_per_peak(adata, self.attr_key)
        mask = peak_mask(
            open_cells,
            adata.n_obs,
            self.min_cells,
            self.min_fraction,
            self.n_top_peaks,
            where=f" in {self.setup} (None keeps every peak)",
            n_min=self.n_min_peaks,
            min_share=self.min_open_share,
        )
        index = np.flatnonzero(mask).astype(np.int64)
        state[SELECTED_PEAKS_KEY] = index
        state[OPEN_CELLS_KEY] = float(open_cells[index].mean()) if len(index) else 0.0
        return state

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        state = super().transfer_field(state_registry, adata_target, **kwargs)
        n_vars = state_registry[self.N_VARS_KEY]
        state[SELECTED_PEAKS_KEY] = np.asarray(
            state_registry.get(SELECTED_PEAKS_KEY, np.arange(n_vars)), dtype=np.int64
        )
        # the statistic of the data the model was set up on, as the selection is
        state[OPEN_CELLS_KEY] = state_registry.get(OPEN_CELLS_KEY)
        return state

    def get_summary_stats(self, state_registry: dict) -> dict:
        stats = super().get_summary_stats(state_registry)
        selected = state_registry.get(SELECTED_PEAKS_KEY)
        stats[N_SELECTED_KEY] = (
            len(selected) if selected is not None else state_registry[self.N_VARS_KEY]
        )
        return stats


#: :class:`PeakLayerField` for the ATAC modality of a MuData (``mod_key=``).
MuDataPeakLayerField = MuDataWrapper(PeakLayerField)
