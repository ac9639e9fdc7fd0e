"""The merge of the Leiden pieces on few cells: its price scaled, its linkage, Leiden's resolution.

The model's own clusters are read, when training ends, off a Leiden partition of the
training cells' posterior means whose pieces ``merge_partition`` merges greedily by the
integrated completed likelihood: a pair is merged when one Gaussian of their union loses
less than ``s x (2 D + 1) / 2 x log(n_i + n_j)`` nats, plus the entropy of the cells'
assignments, against the two-component mixture (the package's ``s`` is 1). On a few hundred
cells the merge leaves fewer clusters than Leiden's pieces, and fewer than there are types.
This script re-reads stored latents with other merges, to see whether one helps the
few-cell subsets without costing the larger sets:

- ``s`` from 1 down to 0 (0: the entropy alone), up to 2 (a dearer component), and no merge
  at all;
- ``complete`` / ``single``: the package's merge (``s = 1``), but two clusters are merged
  only if every pair (``complete``) or at least one pair (``single``) of Leiden's original
  pieces across them would be merged on its own, so that a union grown by earlier merges
  does not take in a piece that none (or not all) of its pieces would take;
- the package's merge on Leiden partitions at resolution 0.5, 0.75, 1.5, 2 and 3
  (``r0.5`` ...);
- ``graph<t>``: the package's merge, but only between clusters that the neighbour graph of
  the points (the one the package's Leiden reads) joins at least ``t`` times as often as a
  random graph of the same degrees would (``graph_ratio``).

Its inputs are the files that ``small_cells.py --save-latents`` and ``pooled_cells.py
--save-latents`` store (``work/small_cells/``: each run's posterior means and variances of
all cells, its training cells, the labels and its own clusters). The readout is the
package's final fit (``fit_gmm(method="leiden", trim=REFIT_TRIM)`` on the training cells
with their posterior variances, Leiden's random state the training seed), its merge
replaced, then the argmax of the mixture on every cell. Every variant reads Leiden at
resolution 1, the package's until 2026-12-07 (night), except the ``r<r>`` ones: for runs
made before that, ``s = 1`` reproduces the run's own clusters (``ari_own_stored``); the
package's final fit now reads resolution 0.75 (``REFIT_RESOLUTION``), the ``r0.75`` column.
Rows go to ``results/merge_penalty.csv``::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/small_cells.py \\
        --dataset forebrain --cells 250 500 750 1043 --seeds 0 1 --methods scale \\
        --save-latents
    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/pooled_cells.py \\
        --dataset forebrain --cells 3000 --parents 8 --seeds 0 1 --methods scale --save-latents
    .venv/bin/python benchmarks/merge_penalty.py [SET_SEED ...]

(with names, e.g. ``forebrain_750_0``, only those stored sets are read again, and the other
rows of the CSV stay).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from _common import RESULTS, WORK, label_scores

from scale_scvi.train import _gmm_init as gmm

CSV = RESULTS / "merge_penalty.csv"
VARIANTS = {
    **{f"{s:g}": {"scale": s} for s in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0, 1.25, 1.5, 2.0)},
    "none": {"scale": None},
    "complete": {"linkage": "complete"},
    "single": {"linkage": "single"},
    **{f"r{r:g}": {"resolution": r} for r in (1.5, 2.0, 3.0, 0.5, 0.75)},
    **{f"graph{t:g}": {"graph": t} for t in (0.3, 0.5, 0.6, 0.7, 0.8)},
}


def piece_edges(latent: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Edges between (and within) the pieces ``labels`` (0 .. n_pieces - 1) of the neighbour
    graph that the package's Leiden reads (``knn_connectivities``: 15 neighbours, the cell
    itself included, symmetrized), each edge counted once whatever its weight: a pieces x
    pieces matrix of counts."""
    from scipy import sparse

    adjacency = (gmm.knn_connectivities(latent) > 0).astype(np.float64)
    member = sparse.csr_matrix((np.ones(len(latent)), (np.arange(len(latent)), labels)))
    return np.asarray((member.T @ adjacency @ member).todense())


def graph_ratio(edges: np.ndarray, members_i: list[int], members_j: list[int]) -> float:
    """Edges between two unions of pieces over the number a random graph of the same degrees
    would put there (``d_i d_j / 2m``; PAGA's connectivity, up to its normalization)."""
    degree = edges.sum(1)
    between = edges[np.ix_(members_i, members_j)].sum()
    expected = degree[members_i].sum() * degree[members_j].sum() / degree.sum()
    return float(between / expected) if expected > 0 else 0.0


def merge_variant(
    latent: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    scale: float | None = 1.0,
    linkage: str | None = None,
    graph: float | None = None,
) -> np.ndarray:
    """``merge_partition``'s greedy merge by ``merge_value`` with its price times ``scale``
    (``None``: no merge) and, with ``linkage`` ("complete" or "single"), the condition on
    the original pieces above; with ``graph``, two clusters are merged only if the
    neighbour graph of the points joins them at least ``graph`` times as often as a random
    graph of the same degrees would (``graph_ratio``); the loop is written out here, since
    the package's has no such knobs."""
    labels = gmm._by_size(np.asarray(labels))
    if scale is None:
        return labels
    price = 0.5 * (2 * latent.shape[1] + 1)

    def value(in_i: np.ndarray, in_j: np.ndarray) -> float:
        # the package's criterion, its price of the extra parameters times scale
        rescale = (scale - 1.0) * price * np.log(weight[in_i | in_j].sum())
        return gmm.merge_value(latent, weight, in_i, in_j) + rescale

    pieces = labels.copy()
    n_pieces = int(pieces.max()) + 1
    alone = np.zeros((n_pieces, n_pieces))  # each pair of original pieces on its own
    if linkage is not None:
        for a in range(n_pieces):
            for b in range(a + 1, n_pieces):
                alone[a, b] = alone[b, a] = value(pieces == a, pieces == b)
    members = {c: [c] for c in range(n_pieces)}
    edges = piece_edges(latent, pieces) if graph is not None else None
    link = {"complete": np.min, "single": np.max}.get(linkage)
    while True:
        best, best_value = None, 0.0
        for i in members:
            for j in members:
                if j <= i:
                    continue
                if link is not None and link(alone[np.ix_(members[i], members[j])]) <= 0:
                    continue
                if edges is not None and graph_ratio(edges, members[i], members[j]) < graph:
                    continue
                v = value(labels == i, labels == j)
                if v > best_value:
                    best, best_value = (i, j), v
        if best is None:
            return gmm._by_size(labels)
        i, j = best
        labels = np.where(labels == j, i, labels)
        members[i] += members.pop(j)


def readout(stored: dict, seed: int, resolution: float = 1.0, **merge) -> np.ndarray:
    """The final fit with the merge ``merge_variant(**merge)``, and the argmax of its
    mixture on all cells."""
    means = stored["qz_m"].astype(np.float64)
    train = stored["train_idx"]
    package_merge = gmm.merge_partition
    gmm.merge_partition = lambda latent, labels, weight, reg: merge_variant(
        latent, labels, weight, **merge
    )
    try:
        weights, mu, var = gmm.fit_gmm(
            means[train],
            30,
            seed,
            posterior_var=stored["qz_v"][train].astype(np.float64),
            method="leiden",
            trim=gmm.REFIT_TRIM,
            resolution=resolution,
        )
    finally:
        gmm.merge_partition = package_merge
    log_p = np.log(weights) - 0.5 * (
        np.log(2 * np.pi * var).sum(1) + ((means[:, None] - mu) ** 2 / var).sum(-1)
    )
    return log_p.argmax(1)


def main() -> None:
    rows = []
    only = sys.argv[1:]  # optional: the stored sets to read (their file names' stems)
    for path in sorted((WORK / "small_cells").glob("*.npz")):
        if only and path.stem not in only:
            continue
        dataset_cells, seed = path.stem.rsplit("_", 1)
        stored = dict(np.load(path, allow_pickle=False))
        labels = stored["labels"]
        row = {
            "set": dataset_cells,
            "seed": int(seed),
            "ari_own_stored": round(label_scores(stored["own"], labels)["ari"], 4),
        }
        for tag, kwargs in VARIANTS.items():
            clusters = readout(stored, int(seed), **kwargs)
            row[f"ari_{tag}"] = round(label_scores(clusters, labels)["ari"], 4)
            row[f"n_{tag}"] = len(np.unique(clusters[stored["train_idx"]]))
        print(row, flush=True)
        rows.append(row)
    table = pd.DataFrame(rows)
    if only and CSV.exists():  # the other sets' rows stay
        earlier = pd.read_csv(CSV)
        keep = ~(earlier["set"] + "_" + earlier["seed"].astype(str)).isin(only)
        table = pd.concat([earlier[keep], table], ignore_index=True)
    table.to_csv(CSV, index=False)


if __name__ == "__main__":
    main()
