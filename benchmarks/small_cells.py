"""The default path on few cells: random subsets of the shared sets' cells, beside LSI.

Small experiments (a few hundred cells, as plate-based scATAC gives) are a size users have,
and the shared sets hold 600 and 1,043 cells. This script draws ``--cells`` cells at random
(without replacement, ``numpy.random.default_rng(seed)``) from a shared set as shipped, and
runs on that subset, one after the other, one thread each:

- this SCALE's default path (``setup_anndata(adata)``, ``SCALE(adata)``,
  ``train(**--train-kwargs)``, by default ``train()``): its own clusters, k-means with the
  true k and Leiden at scanpy's defaults on its latent, and how many cells lie far out in
  the latent (``n_far``: farther from the median cell than 5 times the median distance);
- LSI (``_common.lsi_embedding``) on the same subset: k-means and Leiden.

One row per method, subset and seed goes to ``results/small_cells.csv``.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/small_cells.py \\
        --dataset forebrain --cells 250 500 --seeds 0 1

``--setup-kwargs`` and ``--model-kwargs`` pass arguments to ``setup_anndata`` (e.g. a peak
selection) and to ``SCALE`` (e.g. ``n_centroids``); ``--save-latents`` stores each SCALE
run's latent for ``merge_penalty.py``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from _common import (
    DATASETS,
    WORK,
    embedding_scores,
    label_scores,
    lsi_embedding,
    record_row,
    save_readout_inputs,
    thin_reads,
    train_default_path,
)

RESULTS = Path(__file__).resolve().parent / "results" / "small_cells.csv"

FIELDS = (
    "dataset",
    "n_cells",
    "seed",
    "method",
    "train_kwargs",
    "setup_kwargs",
    "model_kwargs",
    "dropout_rate",
    "decoder_weight_decay",
    "n_lsi",
    "ari_own",
    "n_own",
    "ari_kmeans",
    "ari_leiden",
    "n_leiden",
    "n_far",
    "n_peaks_read",
    "epochs",
    "train_s",
    "date",
)


def subset(dataset: str, n_cells: int, seed: int, keep: float | None = None) -> Path:
    """``n_cells`` random cells of a shared set (in their shipped order), as an ``.h5ad``;
    with ``keep``, each read of theirs (each open entry of a binary set) kept with that
    probability (``numpy.random.default_rng([seed, 1])``): the same cells, shallower."""
    import anndata as ad
    import scipy.sparse as sp

    from scale_scvi.data import shared_data_path

    suffix = "" if keep is None else f"_keep{keep}"
    path = WORK / f"small_{dataset}_{n_cells}_s{seed}{suffix}.h5ad"
    if not path.exists():
        adata = ad.read_h5ad(shared_data_path(DATASETS[dataset]))
        if n_cells > adata.n_obs:
            raise SystemExit(f"{dataset} has {adata.n_obs} cells, fewer than {n_cells}.")
        rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
        adata = adata[rows].copy()
        if keep is not None:
            x = sp.csr_matrix(adata.X, dtype=np.float32)
            adata.X = thin_reads(x, keep, np.random.default_rng([seed, 1]))
        WORK.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return path


def far_cells(latent: np.ndarray, factor: float = 5.0) -> int:
    """Cells farther from the median cell than ``factor`` times the median such distance."""
    dist = np.linalg.norm(latent - np.median(latent, axis=0), axis=1)
    return int((dist > factor * np.median(dist)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--cells", type=int, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["scale", "lsi"])
    parser.add_argument(
        "--keep",
        type=float,
        default=None,
        help="keep each read of the subset with this probability (a shallower set of the "
        "same cells); the row's dataset is then <dataset>_keep<F>",
    )
    parser.add_argument(
        "--train-kwargs", default="{}", help="JSON: arguments of train() (default: none)"
    )
    parser.add_argument(
        "--setup-kwargs", default="{}", help="JSON: arguments of setup_anndata (default: none)"
    )
    parser.add_argument(
        "--model-kwargs", default="{}", help="JSON: arguments of SCALE() (default: none)"
    )
    parser.add_argument(
        "--save-latents",
        action="store_true",
        help="also store each SCALE run's posterior moments, training cells, labels and own "
        "clusters in work/small_cells/ (read by merge_penalty.py); with --*-kwargs, --tag "
        "names the files",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="with --save-latents: a word for the stored files' names, <set>_<cells>_<tag>_<seed>",
    )
    args = parser.parse_args()
    train_kwargs = json.loads(args.train_kwargs)
    setup_kwargs = json.loads(args.setup_kwargs)
    model_kwargs = json.loads(args.model_kwargs)
    if args.save_latents and (setup_kwargs or model_kwargs or train_kwargs) and not args.tag:
        parser.error("--save-latents with --*-kwargs needs a --tag to name the stored files")
    import anndata as ad
    import torch

    from scale_scvi import SCALE
    from scale_scvi.model._scale import default_decoder_weight_decay

    train_weight_decay = inspect.signature(SCALE.train).parameters["weight_decay"].default
    for n_cells in args.cells:
        for seed in args.seeds:
            path = subset(args.dataset, n_cells, seed, args.keep)
            name = args.dataset if args.keep is None else f"{args.dataset}_keep{args.keep}"
            base = {"dataset": name, "n_cells": n_cells, "seed": seed}
            if "scale" in args.methods:
                # again before every run: the scoring of the previous one (scikit-learn's
                # k-means, scanpy) leaves torch at the machine's thread count
                torch.set_num_threads(1)
                adata, model, train_s = train_default_path(
                    path, seed, model_kwargs, setup_kwargs, **train_kwargs
                )
                labels = adata.obs["cell_type"].astype(str).to_numpy()
                latent = model.get_latent_representation()
                own = model.get_cluster_assignments()
                if args.save_latents:
                    tag = f"_{args.tag}" if args.tag else ""
                    save_readout_inputs(f"{name}_{n_cells}{tag}_{seed}", model, labels, own)
                row = {
                    **base,
                    "method": "scale",
                    "train_kwargs": json.dumps(train_kwargs, sort_keys=True),
                    "setup_kwargs": json.dumps(setup_kwargs, sort_keys=True),
                    "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
                    "dropout_rate": model.module.dropout_rate,
                    "decoder_weight_decay": round(
                        train_kwargs.get(
                            "decoder_weight_decay",
                            default_decoder_weight_decay(
                                model._open_cells_per_peak(),
                                train_kwargs.get("weight_decay", train_weight_decay),
                            ),
                        ),
                        4,
                    ),
                    # what the encoder read: LSI coordinates, or the peaks
                    "n_lsi": model.module.n_lsi or "peaks",
                    "ari_own": round(label_scores(own, labels)["ari"], 4),
                    "n_own": model.n_clusters_,
                    **embedding_scores(latent, labels, seed),
                    "n_far": far_cells(latent),
                    "n_peaks_read": len(model.selected_peaks_),
                    "epochs": len(model.history["elbo_train"]),
                    "train_s": round(train_s, 1),
                }
                record_row(RESULTS, row, fields=list(FIELDS))
            if "lsi" in args.methods:
                adata = ad.read_h5ad(path)
                labels = adata.obs["cell_type"].astype(str).to_numpy()
                latent = lsi_embedding(adata.X, seed)
                row = {
                    **base,
                    "method": "lsi",
                    "train_kwargs": "",
                    **embedding_scores(latent, labels, seed),
                    "n_far": far_cells(latent),
                }
                record_row(RESULTS, row, fields=list(FIELDS))


if __name__ == "__main__":
    main()
