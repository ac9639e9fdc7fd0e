"""The link of the ATAC likelihood: logit (the original SCALE's) against complementary log-log.

Trains the default path (the matrix as shipped, ``setup_anndata(adata)``, ``SCALE(adata)``,
``train()``, one thread) with ``atac_link`` set to each link, at a given seed, and appends
one row per run to ``results/atac_link.csv``: k-means with the true k on the latent
(``n_init=20``, ``random_state=0``, as ``run_quality.py`` scores), the model's own clusters,
and how much of the latent the cell's depth explains within its type (``depth_r2``: the
R^2 of a linear regression of the latent on the log number of open peaks, fitted per
type and averaged over the types). ``--file`` runs another labeled ``.h5ad`` (e.g. a
simulated one, ``obs["cell_type"]``) instead of a shared dataset.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/atac_link.py \\
        --dataset cell_lines --seeds 0 1 2 --links logit cloglog
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from _common import DATASETS, append_rows, cluster_scores, label_scores, train_default_path

RESULTS = Path(__file__).resolve().parent / "results" / "atac_link.csv"


def depth_r2(latent: np.ndarray, x, labels: np.ndarray) -> float:
    """Mean over the types of the R^2 of the latent on the log number of open peaks."""
    from sklearn.linear_model import LinearRegression

    log_depth = np.log(np.maximum(np.asarray((x > 0).sum(1)).ravel(), 1))[:, None]
    scores = []
    for t in np.unique(labels):
        rows = labels == t
        if rows.sum() < 3:
            continue
        fit = LinearRegression().fit(log_depth[rows], latent[rows])
        scores.append(fit.score(log_depth[rows], latent[rows]))
    return float(np.mean(scores))


def run(file: str | Path, seed: int, link: str, train_kwargs: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    adata, model, train_s = train_default_path(
        file, seed, model_kwargs={"atac_link": link}, **train_kwargs
    )
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    latent = model.get_latent_representation()
    own = np.asarray(model.get_cluster_assignments())
    return {
        "ari_kmeans": round(cluster_scores(latent, labels)["ari"], 4),
        "ari_own": round(label_scores(own, labels)["ari"], 4),
        "n_own": len(np.unique(own)),
        "depth_r2": round(depth_r2(latent, adata.X, labels), 3),
        "train_s": round(train_s, 1),
        "n_epochs": int(model.history["elbo_train"].shape[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS))
    parser.add_argument("--file", help="a labeled .h5ad instead of a shared dataset")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--links", nargs="+", default=["logit", "cloglog"])
    parser.add_argument("--max-epochs", type=int, default=None)
    args = parser.parse_args()

    from scale_scvi.data import shared_data_path

    if (args.dataset is None) == (args.file is None):
        raise SystemExit("Give one of --dataset and --file.")
    file = Path(args.file) if args.file else DATASETS[args.dataset]
    if args.dataset and shared_data_path(file) is None:
        raise SystemExit(f"{file} not found: set SCALE_SCVI_DATA.")
    train_kwargs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    for seed in args.seeds:
        for link in args.links:
            row = {
                "dataset": args.dataset or Path(args.file).stem,
                "seed": seed,
                "atac_link": link,
                "implementation": "package",
                "train": json.dumps(train_kwargs, sort_keys=True),
                **run(file, seed, link, train_kwargs),
                "threads": 1,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            print(json.dumps(row), flush=True)
            append_rows(RESULTS, [row])


if __name__ == "__main__":
    main()
