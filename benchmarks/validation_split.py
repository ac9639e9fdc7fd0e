"""Does holding out a validation split cost clustering quality?

Trains SCALE on the default path (the matrix as shipped, ``setup_anndata(adata)``,
``SCALE(adata)`` with no K, ``train()``) with ``train_size=1.0`` and with a held-out split,
on the forebrain and cell-line sets, one thread, and prints the ARI over all cells of the
model's own clusters and of k-means (true k) on the latent means. Rows are appended to
``results/validation_split.csv``; the reading is in validation_split.md.

    OMP_NUM_THREADS=1 python benchmarks/validation_split.py --seeds 0 1 2 --train-sizes 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from _common import train_default_path
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

CSV = Path(__file__).resolve().parent / "results" / "validation_split.csv"
DATASETS = {
    "forebrain": ("preissl2018_forebrain_1043cells.h5ad", 8),
    "cell_lines": ("schep2017_celllines_600cells.h5ad", 12),
}


def run(name: str, train_size: float, seed: int) -> dict:
    file, k = DATASETS[name]
    adata, model, seconds = train_default_path(file, seed, train_size=train_size)
    z = model.get_latent_representation()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    km = KMeans(k, n_init=20, random_state=0).fit_predict(z)
    return {
        "dataset": name,
        "train_size": train_size,
        "seed": seed,
        "ari_own": adjusted_rand_score(truth, model.get_cluster_assignments()),
        "n_own": model.n_clusters_,
        "ari_kmeans": adjusted_rand_score(truth, km),
        "epochs": len(model.history["elbo_train"]),
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
                pd.DataFrame([r]).to_csv(CSV, mode="a", header=not CSV.exists(), index=False)
                print(
                    f"{r['dataset']}\ttrain_size={r['train_size']}\tseed={r['seed']}\t"
                    f"ARI own {r['ari_own']:.3f} ({r['n_own']})\t"
                    f"ARI k-means {r['ari_kmeans']:.3f}\t"
                    f"{r['seconds']:.0f} s\tvalidation curve: {r['has_validation']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
