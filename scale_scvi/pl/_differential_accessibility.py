"""Matrix plot of the top differentially accessible peaks of each group (scanpy's)."""

from __future__ import annotations

from typing import Literal

import pandas as pd
import scanpy as sc
from anndata import AnnData

_COLUMNS = ("prob_da", "effect_size", "group1")


def top_da_peaks(
    da: pd.DataFrame, n_top: int = 5, direction: Literal["open", "closed", "both"] = "open"
) -> dict[str, list[str]]:
    """The ``n_top`` peaks of each comparison of a one-vs-rest DA table, by ``prob_da``.

    Parameters
    ----------
    da
        Table of :meth:`~scale_scvi.SCALE.differential_accessibility` (or
        :meth:`~scale_scvi.SCALE.differential_accessibility_components`) with a ``group1``
        column, i.e. computed with ``groupby``.
    n_top
        Peaks per group.
    direction
        ``"open"``: peaks more accessible in the group (``effect_size < 0``, as the effect
        is ``est_prob2 - est_prob1``); ``"closed"``: less accessible; ``"both"``.

    Returns
    -------
    ``{group: [peak, ...]}`` in the order of the groups in the table.
    """
    if not isinstance(da, pd.DataFrame) or not set(_COLUMNS) <= set(da.columns):
        raise ValueError(
            f"da must be a table of SCALE.differential_accessibility with columns {list(_COLUMNS)}"
            " (computed with groupby=..., so that it has a group1 column)."
        )
    if n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top}.")
    if direction not in ("open", "closed", "both"):
        raise ValueError(f"direction must be 'open', 'closed' or 'both', got {direction!r}.")
    peaks = {}
    for group, table in da.groupby("group1", sort=False):
        if direction == "open":
            table = table[table["effect_size"] < 0]
        elif direction == "closed":
            table = table[table["effect_size"] > 0]
        top = table.sort_values(["prob_da", "effect_size"], ascending=[False, True], kind="stable")
        peaks[str(group)] = top.index[:n_top].astype(str).tolist()
    return peaks


def differential_accessibility(
    adata: AnnData,
    da: pd.DataFrame,
    groupby: str,
    n_top: int = 5,
    direction: Literal["open", "closed", "both"] = "open",
    layer: str | None = None,
    standard_scale: str | None = "var",
    cmap: str = "Reds",
    show: bool | None = None,
    save: str | bool | None = None,
    **kwargs,
):
    """:func:`scanpy.pl.matrixplot` of the top differentially accessible peaks per group.

    Rows are the groups of ``obs[groupby]``; columns the ``n_top`` peaks of each group in a
    one-vs-rest table (by ``prob_da``), in labelled blocks. The values are the mean of
    ``adata.X`` (the fraction of open cells for binary data) or of ``layer`` (e.g. the
    imputation of :meth:`~scale_scvi.SCALE.get_normalized_accessibility` stored there).

    Parameters
    ----------
    adata
        Cells x peaks AnnData with ``obs[groupby]`` (for a MuData, its ATAC modality with
        the groups copied to its ``obs``).
    da
        One-vs-rest table of :meth:`~scale_scvi.SCALE.differential_accessibility` computed
        with ``groupby`` (``group1`` column).
    groupby
        Column of ``adata.obs`` with the groups.
    n_top, direction
        Peaks per group and which ones (see :func:`top_da_peaks`).
    layer
        Layer to average (default: ``adata.X``).
    standard_scale
        ``"var"`` (default) scales each peak to ``[0, 1]``; ``None`` keeps the means.
    cmap
        Colour map.
    show, save
        As in :func:`scanpy.pl.matrixplot`.
    **kwargs
        Further arguments of :func:`scanpy.pl.matrixplot`.

    Returns
    -------
    What :func:`scanpy.pl.matrixplot` returns (a dict of axes unless shown).

    Examples
    --------
    >>> adata.obs["scale_cluster"] = model.get_cluster_assignments()
    >>> da = model.differential_accessibility(groupby="scale_cluster")
    >>> scale_scvi.pl.differential_accessibility(adata, da, groupby="scale_cluster")
    """
    if groupby not in adata.obs:
        raise ValueError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)})."
        )
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} is not in adata.layers ({list(adata.layers)}).")
    peaks = {g: p for g, p in top_da_peaks(da, n_top, direction).items() if p}
    missing = [p for ps in peaks.values() for p in ps if p not in adata.var_names]
    if missing:
        raise ValueError(
            f"{len(missing)} peaks of the table are not in adata.var_names (e.g. "
            f"{missing[0]!r}); use the AnnData the model was trained on."
        )
    if not peaks:
        raise ValueError("No peak of the table goes in that direction; try direction='both'.")
    return sc.pl.matrixplot(
        adata,
        var_names=peaks,
        groupby=groupby,
        layer=layer,
        standard_scale=standard_scale,
        cmap=cmap,
        show=show,
        save=save,
        **kwargs,
    )
