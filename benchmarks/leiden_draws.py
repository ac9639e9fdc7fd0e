"""How much of the own clusters' score is the random draw of the Leiden partition.

The default path's own clusters (``get_cluster_assignments()``) are the argmax of the
mixture that training refits, when it ends, on the training cells' posterior means: a
Leiden partition (random seed 0) of their 15-nearest-neighbour graph, merged where one
Gaussian describes two clusters as well (BIC), read as a diagonal Gaussian mixture. This
script trains the default path (the matrix as shipped, ``setup_anndata(adata)``,
``SCALE(adata)``, ``train()``, one thread), keeps the final posterior means, and repeats
that refit on them with only Leiden's random seed changed (0-7), on the training cells and
on all cells, with Leiden's two iterations (scanpy's default) and iterated to convergence;
each refit's argmax over all cells is scored against the labels. The partitions'
modularity is kept too, to see whether the best-modularity draw is the better one.

Rows go to ``results/leiden_draws.csv``; the trained models' latents to
``work/leiden_draws/`` (reused when there)::

    .venv/bin/python benchmarks/leiden_draws.py --dataset forebrain --seeds 0 2
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from _common import DATASETS, RESULTS, WORK, label_scores, train_default_path

from scale_scvi.train import _gmm_init as gmm

CSV = RESULTS / "leiden_draws.csv"
N_DRAWS = 8


def trained_latent(dataset: str, seed: int) -> dict[str, np.ndarray]:
    """Posterior means and variances of all cells, the training cells, the labels and the
    model's own clusters, of the default path at ``seed`` (trained once, then reused)."""
    path = WORK / "leiden_draws" / f"{dataset}_{seed}.npz"
    if not path.exists():
        import torch

        torch.set_num_threads(1)
        adata, model, _ = train_default_path(DATASETS[dataset], seed)
        lat, var = model.get_latent_representation(return_dist=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            lat=lat,
            var=var,
            own=np.asarray(model.get_cluster_assignments()).astype(np.int64),
            train_idx=np.asarray(model.train_indices),
            labels=np.asarray(adata.obs["cell_type"].astype(str), dtype=str),
        )
    return dict(np.load(path, allow_pickle=False))


def graph_leiden(graph, seed: int, n_iterations: int = 2) -> tuple[np.ndarray, float]:
    """Leiden (modularity, resolution 1, igraph as ``_gmm_init.leiden_partition`` calls it,
    here with the number of iterations as an argument) on a symmetric weighted graph: the
    labels by decreasing size and the partition's modularity."""
    import igraph as ig

    graph = graph.tocoo()
    upper = graph.row < graph.col
    g = ig.Graph(n=graph.shape[0], edges=np.c_[graph.row[upper], graph.col[upper]].tolist())
    g.es["weight"] = graph.data[upper].tolist()
    ig.set_random_number_generator(random.Random(seed))
    try:
        parts = g.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=1.0,
            beta=0.01,
            n_iterations=n_iterations,
        )
    finally:
        ig.set_random_number_generator(random)
    return gmm._by_size(np.asarray(parts.membership)), g.modularity(parts.membership, "weight")


def leiden(latent: np.ndarray, seed: int, n_iterations: int) -> tuple[np.ndarray, float]:
    """The refit's Leiden partition (of the 15-nearest-neighbour graph of ``latent``) and its
    modularity."""
    return graph_leiden(gmm.knn_connectivities(latent, 15), seed, n_iterations)


def partition_mixture(
    x: np.ndarray, labels: np.ndarray, posterior_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mixture the refit reads off a partition of ``x`` (unit row weights): each
    cluster's moments, its variance widened by its cells' mean posterior variance."""
    k = int(labels.max()) + 1
    w, mu, v = gmm._partition_mixture(x, labels, k, np.ones(len(x)))
    resp = np.eye(k)[labels]
    return w, mu, v + 1e-4 + (resp / resp.sum(0, keepdims=True)).T @ posterior_var


def refit_clusters(
    lat: np.ndarray, var: np.ndarray, rows: np.ndarray, seed: int, n_iterations: int
) -> tuple[np.ndarray, float]:
    """The final refit on ``rows`` (partition, BIC merge, moments plus the posterior
    variances) and the argmax of its mixture over every cell; the partition's modularity."""
    x = lat[rows].astype(np.float64)
    labels, modularity = leiden(x, seed, n_iterations)
    labels = gmm.merge_partition(x, labels, np.ones(len(x)), 1e-4)
    w, mu, v = partition_mixture(x, labels, var[rows])
    log_p = np.log(w)[None] - 0.5 * (
        np.log(2 * np.pi * v).sum(-1)[None] + ((lat[:, None, :] - mu[None]) ** 2 / v[None]).sum(-1)
    )
    return log_p.argmax(1), modularity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        d = trained_latent(args.dataset, seed)
        lat, var, labels = d["lat"], d["var"], d["labels"]
        model = label_scores(d["own"], labels)["ari"]
        for cells, idx in [("training", d["train_idx"]), ("all", np.arange(len(lat)))]:
            for n_iterations in (2, -1):
                for draw in range(N_DRAWS):
                    pred, q = refit_clusters(lat, var, idx, draw, n_iterations)
                    rows.append(
                        {
                            "dataset": args.dataset,
                            "seed": seed,
                            "cells": cells,
                            "n_iterations": n_iterations,
                            "leiden_seed": draw,
                            "modularity": q,
                            "ari": label_scores(pred, labels)["ari"],
                            "n_clusters": len(np.unique(pred)),
                            "ari_model_own": model,
                        }
                    )
        summary = pd.DataFrame(rows)
        summary = summary[summary.seed == seed]
        print(
            summary.groupby(["cells", "n_iterations"])
            .ari.agg(["mean", "min", "max"])
            .round(3)
            .assign(model=round(model, 3))
        )
    new = pd.DataFrame(rows)
    if CSV.exists():
        old = pd.read_csv(CSV)
        old = old[~((old.dataset == args.dataset) & old.seed.isin(args.seeds))]
        new = pd.concat([old, new], ignore_index=True)
    new.to_csv(CSV, index=False)


if __name__ == "__main__":
    main()
