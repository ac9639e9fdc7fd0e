"""Heatmap of cluster-specific peaks across groups of cells."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.axes import Axes

from ._utils import finish

_COLUMNS = ("component", "peak", "rank")


def _group_means(matrix, groups: pd.Categorical, binarize: bool) -> np.ndarray:
    """Mean of each column within each group, for a (cells, few peaks) matrix."""
    if sp.issparse(matrix):
        matrix = matrix.toarray()
    matrix = np.asarray(matrix, dtype=float)
    if binarize:
        matrix = (matrix > 0).astype(float)
    out = np.zeros((len(groups.categories), matrix.shape[1]))
    for i in range(len(groups.categories)):
        rows = groups.codes == i
        if rows.any():
            out[i] = matrix[rows].mean(0)
    return out


def cluster_specific_peaks(
    adata: AnnData,
    peaks: pd.DataFrame,
    groupby: str = "scale_cluster",
    n_top: int = 5,
    layer: str | None = None,
    binarize: bool = True,
    standard_scale: bool = True,
    cmap: str = "Reds",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | None = None,
) -> Axes | None:
    """Heatmap of the top cluster-specific peaks of each component across groups of cells.

    Rows are the groups of ``obs[groupby]``; columns the ``n_top`` best peaks of every
    component in ``peaks``, in blocks labelled by component. Each cell of the heatmap is the
    fraction of cells of the group in which the peak is open (or the mean of the values when
    ``binarize=False``, e.g. for imputed probabilities in a layer).

    Parameters
    ----------
    adata
        Cells x peaks AnnData holding the groups in ``obs[groupby]``.
    peaks
        Table of :meth:`~scale_scvi.SCALE.get_cluster_specific_peaks` (columns
        ``component``, ``peak`` and ``rank``).
    groupby
        Column of ``adata.obs`` with the groups (default: SCALE's clusters).
    n_top
        Peaks shown per component.
    layer
        Layer to read (default: ``adata.X``).
    binarize
        Count a peak as open when its value is > 0 and show fractions of cells.
    standard_scale
        Scale each column to ``[0, 1]`` so that peaks of different depth can be compared.
    cmap
        Colour map.
    ax
        Axes to draw on; a new figure by default.
    show
        Show the figure (default: when the matplotlib backend is interactive).
    save
        Save the figure to this path.

    Returns
    -------
    The axes of the heatmap, unless the figure was shown.

    Examples
    --------
    >>> peaks = model.get_cluster_specific_peaks(n_top=20)
    >>> scale_scvi.pl.cluster_specific_peaks(adata, peaks, groupby="scale_cluster")
    """
    if not isinstance(peaks, pd.DataFrame) or not set(_COLUMNS) <= set(peaks.columns):
        raise ValueError(
            "peaks must be the DataFrame of SCALE.get_cluster_specific_peaks (columns "
            f"{list(_COLUMNS)})."
        )
    if n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top}.")
    if groupby not in adata.obs:
        raise ValueError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); e.g. adata.obs['scale_cluster'] = "
            "model.get_cluster_assignments()."
        )
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} is not in adata.layers ({list(adata.layers)}).")
    top = peaks[peaks["rank"] <= n_top].copy()
    top["component"] = top["component"].astype(str)
    components = list(dict.fromkeys(top["component"]))
    try:
        components.sort(key=int)
    except ValueError:
        pass
    top["order"] = top["component"].map({c: i for i, c in enumerate(components)})
    top = top.sort_values(["order", "rank"], kind="stable")
    missing = top.loc[~top["peak"].isin(adata.var_names), "peak"]
    if len(missing):
        raise ValueError(
            f"{len(missing)} peaks of the table are not in adata.var_names (e.g. "
            f"{missing.iloc[0]!r}); use the AnnData the model was trained on."
        )
    columns = adata.var_names.get_indexer(top["peak"])
    matrix = adata.X if layer is None else adata.layers[layer]
    groups = pd.Categorical(adata.obs[groupby])
    values = _group_means(matrix[:, columns], groups, binarize)
    if standard_scale:
        low, high = values.min(0), values.max(0)
        values = (values - low) / np.where(high > low, high - low, 1.0)

    if ax is None:
        _, ax = plt.subplots(
            figsize=(
                max(4.0, 0.22 * len(columns) + 2.0),
                max(2.5, 0.35 * len(groups.categories) + 1.5),
            )
        )
    fig = ax.figure
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_yticks(np.arange(len(groups.categories)))
    ax.set_yticklabels([str(c) for c in groups.categories], fontsize=8)
    ax.set_ylabel(groupby)
    block = top["component"].to_numpy()
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    ends = np.r_[starts[1:], len(block)]
    ax.set_xticks((starts + ends - 1) / 2)
    ax.set_xticklabels(block[starts], fontsize=8)
    ax.set_xlabel(f"top {n_top} specific peaks of each component")
    for start in starts[1:]:
        ax.axvline(start - 0.5, color="black", linewidth=0.6)
    label = "fraction of cells open" if binarize else "mean value"
    fig.colorbar(
        image,
        ax=ax,
        label=f"{label} (scaled)" if standard_scale else label,
        fraction=0.05,
        pad=0.02,
    )
    if finish(fig, show, save):
        return None
    return ax
