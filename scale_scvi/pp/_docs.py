"""Parameter descriptions shared by the functions of :mod:`scale_scvi.pp`.

Written once here and put into each docstring by :data:`pp_dsp` (``@pp_dsp.dedent``, then
``%(adata)s`` where the description goes), as scvi-tools shares its own with docrep.
"""

from __future__ import annotations

from docrep import DocstringProcessor

_adata = """\
adata
    Cells x peaks AnnData (in memory or backed)."""

_layer = """\
layer
    Layer holding the peak matrix; ``None`` for ``adata.X``."""

_cells = """\
cells
    Boolean mask of the cells to count (default: all), e.g. from :func:`filter_cells`."""

_inplace_copy = """\
inplace
    Filter ``adata`` itself (as scanpy's filters do) and return ``None``.
copy
    Return a filtered copy of ``adata``."""

pp_dsp = DocstringProcessor(adata=_adata, layer=_layer, cells=_cells, inplace_copy=_inplace_copy)
