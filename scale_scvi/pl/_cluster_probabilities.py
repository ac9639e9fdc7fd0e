"""Heatmap of the cluster probabilities of every cell."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap

from ._utils import finish


def _probabilities(data: AnnData | np.ndarray, key: str) -> np.ndarray:
    if isinstance(data, AnnData):
        if key not in data.obsm:
            raise ValueError(
                f"adata.obsm has no {key!r} (keys: {list(data.obsm)}); store "
                f"model.get_cluster_probabilities() there first, e.g. "
                f"adata.obsm[{key!r}] = model.get_cluster_probabilities()."
            )
        probs = data.obsm[key]
    else:
        probs = data
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(
            f"Cluster probabilities must be a (cells, components) array, got {probs.shape}."
        )
    return probs


def cluster_probabilities(
    data: AnnData | np.ndarray,
    key: str = "scale_probabilities",
    groupby: str | None = None,
    drop_unused: bool = True,
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | None = None,
) -> Axes | None:
    """Heatmap of the cluster probabilities ``p(c | z)``: cells (rows) by components (columns).

    Cells are sorted by their most probable component (and by ``groupby`` first, when given,
    with a coloured strip showing the groups), so that a sharp clustering shows as a
    block-diagonal matrix.

    Parameters
    ----------
    data
        An AnnData with the probabilities in ``obsm[key]``, or the
        ``(n_cells, n_clusters_)`` array of :meth:`~scale_scvi.SCALE.get_cluster_probabilities`.
    key
        Key of ``adata.obsm`` holding the probabilities.
    groupby
        Column of ``adata.obs`` to group the cells by (e.g. known cell types).
    drop_unused
        Leave out components that are the most probable one of no cell.
    cmap
        Colour map of the probabilities.
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
    >>> adata.obsm["scale_probabilities"] = model.get_cluster_probabilities()
    >>> scale_scvi.pl.cluster_probabilities(adata, groupby="cell_type")
    """
    probs = _probabilities(data, key)
    n_cells, n_comp = probs.shape
    assignment = probs.argmax(1)
    columns = np.unique(assignment) if drop_unused else np.arange(n_comp)
    # Columns in order of their cluster size, rows by group, then cluster, then confidence.
    columns = columns[
        np.argsort(-np.bincount(assignment, minlength=n_comp)[columns], kind="stable")
    ]
    column_rank = np.empty(n_comp, dtype=int)
    column_rank[columns] = np.arange(len(columns))
    if drop_unused:
        column_rank[np.setdiff1d(np.arange(n_comp), columns)] = len(columns)
    sort_keys = [-probs.max(1), column_rank[assignment]]
    groups = None
    if groupby is not None:
        if not isinstance(data, AnnData):
            raise ValueError("groupby needs an AnnData, not an array of probabilities.")
        if groupby not in data.obs:
            raise ValueError(
                f"groupby={groupby!r} is not a column of adata.obs (columns: "
                f"{list(data.obs.columns)})."
            )
        groups = pd.Categorical(data.obs[groupby])
        sort_keys.append(groups.codes)
    order = np.lexsort(sort_keys)

    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(columns) + 2.5), 5.0))
    fig = ax.figure
    image = ax.imshow(
        probs[np.ix_(order, columns)],
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
    )
    ax.set_xticks(np.arange(len(columns)))
    ax.set_xticklabels([str(c) for c in columns], fontsize=8)
    ax.set_xlabel("mixture component")
    ax.set_ylabel(f"cells (n = {n_cells})")
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, label="p(c | z)", fraction=0.05, pad=0.02)
    if groups is not None:
        codes = groups.codes[order]
        strip = ax.inset_axes([-0.06, 0.0, 0.04, 1.0])
        palette = ListedColormap(plt.get_cmap("tab20").colors[: max(1, len(groups.categories))])
        strip.imshow(
            codes[:, None],
            aspect="auto",
            interpolation="nearest",
            cmap=palette,
            vmin=-0.5,
            vmax=len(groups.categories) - 0.5,
        )
        strip.set_xticks([])
        centers = [
            np.flatnonzero(codes == i).mean()
            for i in range(len(groups.categories))
            if (codes == i).any()
        ]
        labels = [str(c) for i, c in enumerate(groups.categories) if (codes == i).any()]
        strip.set_yticks(centers)
        strip.set_yticklabels(labels, fontsize=8)
        ax.set_ylabel("")
        strip.set_ylabel(groupby)
    if finish(fig, show, save):
        return None
    return ax
