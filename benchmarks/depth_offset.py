"""What the depth offset costs or gains: clustering and reported likelihoods with and without it.

With ``depth_offset=True`` (the default) the ATAC likelihood is conditional on each cell's
observed depth, read from the cell itself, so ``get_elbo``/``get_marginal_ll`` are not
normalized over ``x``; with ``depth_offset=False`` they are (see docs/math.md, section 1).
This runs one model per setting on a shared dataset (peaks open in >= 2 % of the cells, as
the quality runner) and appends one row per run to ``results/depth_offset.csv``: k-means ARI
on the latent, ARI of the cluster assignments, the ELBO and the marginal log-likelihood
(importance-sampled) per cell, and the training time.

Usage (from the repository root, one thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/depth_offset.py \
        --dataset forebrain --seed 0 --depth-offset off
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import RESULTS, append_rows, cluster_scores, cpu_model, label_scores, load_matrix
from _common import prepare_dataset as prepare

MIN_OPEN_FRACTION = 0.02
FIELDS = [
    "dataset",
    "seed",
    "depth_offset",
    "n_epochs",
    "ari_kmeans",
    "ari_argmax",
    "elbo",
    "marginal_ll",
    "train_s",
    "machine",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="forebrain", choices=["forebrain", "cell_lines"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth-offset", choices=["on", "off"], required=True)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: train()'s")
    parser.add_argument("--n-mc-samples", type=int, default=50)
    args = parser.parse_args()

    import anndata as ad
    import scvi
    import torch

    from scale_scvi import SCALE

    torch.set_num_threads(1)
    path = prepare(args.dataset, MIN_OPEN_FRACTION)
    if path is None:
        raise SystemExit(f"{args.dataset} is not in the shared data folder (SCALE_SCVI_DATA).")
    X, labels = load_matrix(path)
    scvi.settings.seed = args.seed
    adata = ad.AnnData(X)
    SCALE.setup_anndata(adata)
    k = len(np.unique(labels))
    model = SCALE(adata, n_centroids=k, depth_offset=args.depth_offset == "on")
    t0 = time.perf_counter()
    model.train(max_epochs=args.max_epochs, enable_progress_bar=False)
    train_s = time.perf_counter() - t0
    latent = model.get_latent_representation()
    argmax = model.get_cluster_probabilities().argmax(1)
    row = {
        "dataset": args.dataset,
        "seed": args.seed,
        "depth_offset": args.depth_offset,
        "n_epochs": model.history["elbo_train"].shape[0],
        "ari_kmeans": round(cluster_scores(latent, labels, args.seed)["ari"], 4),
        "ari_argmax": round(label_scores(argmax, labels)["ari"], 4),
        "elbo": round(model.get_elbo(), 2),
        "marginal_ll": round(model.get_marginal_ll(n_mc_samples=args.n_mc_samples), 2),
        "train_s": round(train_s, 1),
        "machine": cpu_model(),
    }
    print(row, flush=True)
    append_rows(RESULTS / "depth_offset.csv", [row], FIELDS)


if __name__ == "__main__":
    main()
