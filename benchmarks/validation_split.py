"""Does holding out a validation split cost clustering quality?

Trains SCALE at its defaults with ``train_size=1.0`` and with a held-out split, on the
forebrain and cell-line sets, one thread, and prints the ARI of k-means (true k) on the
latent means and of the argmax assignments, over all cells. Results: validation_split.md.

    OMP_NUM_THREADS=1 python benchmarks/validation_split.py --seeds 0
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import scvi
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from scale_scvi import SCALE
from scale_scvi.data import shared_data_path

DATASETS = {
    "forebrain": ("preissl2018_forebrain_1043cells.h5ad", 8),
    "cell_lines": ("schep2017_celllines_600cells.h5ad", 12),
}


def load(name: str) -> tuple[ad.AnnData, int]:
    file, k = DATASETS[name]
    adata = ad.read_h5ad(shared_data_path(file))
    open_in = np.asarray((adata.X > 0).sum(0)).ravel()
    return adata[:, open_in >= 0.02 * adata.n_obs].copy(), k


def run(name: str, train_size: float, seed: int) -> dict:
    adata, k = load(name)
    scvi.settings.seed = seed
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=k)
    start = time.perf_counter()
    model.train(train_size=train_size, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    z = model.get_latent_representation()
    truth = adata.obs["cell_type"].cat.codes
    km = KMeans(k, n_init=20, random_state=0).fit_predict(z)
    return {
        "dataset": name,
        "train_size": train_size,
        "seed": seed,
        "ari_kmeans": adjusted_rand_score(truth, km),
        "ari_argmax": adjusted_rand_score(truth, model.get_cluster_assignments()),
        "seconds": seconds,
        "has_validation": "elbo_validation" in model.history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-sizes", type=float, nargs="+", default=[1.0, 0.9])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.datasets:
        for seed in args.seeds:
            for size in args.train_sizes:
                r = run(name, size, seed)
                print(
                    f"{r['dataset']}\ttrain_size={r['train_size']}\tseed={r['seed']}\t"
                    f"ARI k-means {r['ari_kmeans']:.3f}\tARI argmax {r['ari_argmax']:.3f}\t"
                    f"{r['seconds']:.0f} s\tvalidation curve: {r['has_validation']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
