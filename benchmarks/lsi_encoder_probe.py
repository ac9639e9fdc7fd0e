"""The encoder reads a cell's LSI coordinates instead of its peaks: a first probe.

Trains the default path (``setup_anndata(adata)``, ``SCALE(adata)``, ``train()``) on a shared
set as shipped, or on the random subset of ``--cells`` cells that ``small_cells.py`` draws,
in its own process at one thread, and appends one row to ``results/lsi_encoder_probe.csv``:
the own clusters, k-means with the true k and Leiden at scanpy's defaults on the latent, the
far cells and the training time.

The variants (``variant`` column):

- ``lsi<d>``: ``SCALE(adata, n_lsi=d)``, the encoder reading ``d`` LSI coordinates
  (:class:`~scale_scvi.module.LSIProjection`). The rows of 2026-12-07 before 11:30 were made
  before the package had ``n_lsi``, with a projection this script then computed itself (the
  same TF-IDF, SVD and row normalization, in float64, the SVD's random state = the seed;
  the package's is float32 with random state 0): run today they come out a little
  different;
- ``package``: ``SCALE(adata)`` as the package makes it, with ``--model-kwargs``;
- ``control``: ``SCALE(adata, n_lsi=None)``, the encoder of the peaks.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/lsi_encoder_probe.py \\
        --dataset forebrain --cells 500 --seed 0 --d 30
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch
from _common import DATASETS, embedding_scores, label_scores, record_row
from small_cells import far_cells, subset

RESULTS = Path(__file__).resolve().parent / "results" / "lsi_encoder_probe.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--cells", type=int, default=0, help="a random subset (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d", type=int, default=30, help="LSI coordinates of lsi<d>")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--control", action="store_true", help="n_lsi=None")
    variant.add_argument("--package", action="store_true", help="SCALE(adata, **kwargs)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON: arguments of SCALE()")
    args = parser.parse_args()
    import anndata as ad
    import scvi

    from scale_scvi import SCALE
    from scale_scvi.data import shared_data_path

    torch.set_num_threads(1)
    if args.cells:
        path = subset(args.dataset, args.cells, args.seed)
    else:
        path = shared_data_path(DATASETS[args.dataset])
    adata = ad.read_h5ad(path)
    scvi.settings.seed = args.seed
    SCALE.setup_anndata(adata)
    kwargs = json.loads(args.model_kwargs)
    if args.control:
        kwargs.setdefault("n_lsi", None)
    elif not args.package:
        kwargs["n_lsi"] = args.d
    model = SCALE(adata, **kwargs)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    train_s = time.perf_counter() - start
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    latent = model.get_latent_representation()
    own = model.get_cluster_assignments()
    row = {
        "dataset": args.dataset,
        "cells": adata.n_obs,
        "seed": args.seed,
        "variant": "control" if args.control else "package" if args.package else f"lsi{args.d}",
        "model_kwargs": args.model_kwargs,
        "ari_own": round(label_scores(own, labels)["ari"], 4),
        "n_own": model.n_clusters_,
        **embedding_scores(latent, labels, args.seed),
        "n_far": far_cells(latent),
        "train_s": round(train_s, 1),
    }
    record_row(RESULTS, row)


if __name__ == "__main__":
    main()
