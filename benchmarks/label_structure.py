"""What the labels of a shared set ask of an embedding, and where SCALE and LSI differ.

The quality table scores k-means with the true number of labels. Some labels of the shared
sets are close relatives: the cell lines hold three lymphoblastoid labels (``LCL 1`` and two
replicates of ``LCL 2``) and two AML patients; forebrain holds three excitatory (EX1-3) and
two inhibitory (IN1-2) neuron labels. This script trains SCALE on the default path (the
matrix as shipped, ``setup_anndata(adata)``, ``SCALE(adata)``, ``train()``, one thread) and
computes LSI (``_common.lsi_embedding``, on the values as shipped, as in the quality table),
and scores each embedding by:

- ``ari_kmeans``: k-means with the true k (``n_init=20``), as in the quality table;
- ``ari_kmeans_merged``: k-means with k = the number of labels once each group of ``MERGED``
  is one label, against those labels (only where the set has such a group);
- ``knn_acc``: the accuracy of a 15-nearest-neighbour classifier of the labels (5-fold,
  stratified, fixed folds): how much of the labelling the embedding holds, whatever a
  clustering then makes of it;
- ``knn_acc_<group>``: the same among the cells of one group of close labels only (can the
  embedding tell them apart);
- for SCALE, ``ari_own`` and ``ari_own_merged``: its own clusters against the labels and
  against the merged labels, and ``n_own`` their number.

Rows go to ``results/label_structure.csv``::

    OMP_NUM_THREADS=1 python benchmarks/label_structure.py --dataset cell_lines --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from _common import (
    DATASETS,
    append_rows,
    cluster_scores,
    label_scores,
    lsi_embedding,
    train_default_path,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "label_structure.csv"
# groups of close labels: (name, label prefix)
GROUPS = {
    "cell_lines": [("lcl", "LCL"), ("aml", "AML")],
    "forebrain": [("ex", "EX"), ("in", "IN")],
}
# the groups whose labels the "merged" scores count as one
MERGED = {"cell_lines": ["LCL"], "forebrain": []}


def _knn_accuracy(latent: np.ndarray, labels: np.ndarray) -> float:
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(15), latent, labels, cv=folds).mean())


def merge_labels(labels: np.ndarray, prefixes: list[str]) -> np.ndarray:
    """The labels with every label that starts with one of ``prefixes`` replaced by it."""
    out = labels.astype(object).copy()
    for prefix in prefixes:
        out[np.char.startswith(labels.astype(str), prefix)] = prefix
    return out.astype(str)


def scores(dataset: str, latent: np.ndarray, labels: np.ndarray, own=None) -> dict:
    row = {
        "ari_kmeans": cluster_scores(latent, labels)["ari"],
        "knn_acc": _knn_accuracy(latent, labels),
    }
    merged = merge_labels(labels, MERGED[dataset]) if MERGED[dataset] else None
    row["ari_kmeans_merged"] = "" if merged is None else cluster_scores(latent, merged)["ari"]
    for name, prefix in GROUPS[dataset]:
        cells = np.char.startswith(labels.astype(str), prefix)
        row[f"knn_acc_{name}"] = _knn_accuracy(latent[cells], labels[cells])
    if own is not None:
        row["ari_own"] = label_scores(own, labels)["ari"]
        row["ari_own_merged"] = "" if merged is None else label_scores(own, merged)["ari"]
        row["n_own"] = int(len(np.unique(own)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-lsi", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        adata, model, train_s = train_default_path(DATASETS[args.dataset], seed)
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        own = np.asarray(model.get_cluster_assignments()).astype(str)
        row = scores(args.dataset, model.get_latent_representation(), labels, own)
        rows.append({"method": "scale", "seed": seed, "train_s": round(train_s, 1), **row})
        if not args.no_lsi:
            latent = lsi_embedding(adata.X, seed)
            rows.append({"method": "lsi", "seed": seed, **scores(args.dataset, latent, labels)})
        print(rows[-2:] if not args.no_lsi else rows[-1:], flush=True)
    fields = ["dataset", "method", "seed", "ari_kmeans", "ari_kmeans_merged", "knn_acc"]
    fields += [f"knn_acc_{name}" for groups in GROUPS.values() for name, _ in groups]
    fields += ["ari_own", "ari_own_merged", "n_own", "train_s", "date"]
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    append_rows(RESULTS, [{"dataset": args.dataset, "date": date, **row} for row in rows], fields)


if __name__ == "__main__":
    main()
