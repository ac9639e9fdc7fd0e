"""The encoder reads a cell's LSI coordinates instead of its peaks: a first probe.

Trains the default path (``setup_anndata(adata)``, ``SCALE(adata)``, ``train()``) on a shared
set as shipped, or on the random subset of ``--cells`` cells that ``small_cells.py`` draws,
in its own process at one thread, and appends one row to ``results/lsi_encoder_probe.csv``:
the own clusters, k-means with the true k and Leiden at scanpy's defaults on the latent, the
far cells and the training time.

The variants (``variant`` column):

- ``lsi<d>``: the model's encoder replaced, before training, by one that reads ``d`` LSI
  coordinates (this script's :class:`LSIEncoder`: TF-IDF of the binarized peaks read,
  ``log1p``, the SVD of all cells' TF-IDF with the first component dropped, rows
  L2-normalized and scaled by ``sqrt(d)``), the encoder of the peaks left out. It was
  written before the package had ``n_lsi``; the package's
  :class:`~scale_scvi.module.LSIProjection` computes the same coordinates;
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

import numpy as np
import scipy.sparse as sp
import torch
from _common import DATASETS, append_rows, embedding_scores, label_scores
from small_cells import far_cells, subset
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "lsi_encoder_probe.csv"


class LSIEncoder(nn.Module):
    """``inner`` (an encoder of ``d`` inputs) fed the LSI coordinates of the peaks read."""

    def __init__(self, inner: nn.Module, idf: np.ndarray, basis: np.ndarray):
        super().__init__()
        self.inner = inner
        self.register_buffer("idf", torch.as_tensor(idf, dtype=torch.float32))
        self.register_buffer("basis", torch.as_tensor(basis, dtype=torch.float32))
        self.scale = float(np.sqrt(basis.shape[1]))

    def forward(self, x, *cats, cont=None):
        x = (x.to_dense() if x.layout != torch.strided else x).float()
        tf = x / x.sum(1, keepdim=True).clamp_min(1.0)
        u = torch.log1p(1e4 * tf * self.idf) @ self.basis
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12) * self.scale
        return self.inner(u, *cats, cont=cont)


def lsi_basis(X, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``idf`` and the SVD basis (components 2 .. d + 1) of the binarized ``X``."""
    from sklearn.decomposition import TruncatedSVD

    X = sp.csr_matrix(X, dtype=np.float64)
    X.data[:] = 1.0
    tf = sp.diags(1.0 / np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)) @ X
    idf = X.shape[0] / np.maximum(np.asarray(X.sum(0)).ravel(), 1.0)
    tfidf = (tf @ sp.diags(idf)).tocsr()
    tfidf.data = np.log1p(tfidf.data * 1e4)
    svd = TruncatedSVD(n_components=d + 1, random_state=seed, algorithm="randomized", n_iter=7)
    svd.fit(tfidf)
    return idf, svd.components_.T[:, 1:]


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
        kwargs["n_lsi"] = None  # the script's encoder replaces the encoder of the peaks
    model = SCALE(adata, **kwargs)
    module = model.module
    if not (args.control or args.package):
        X = sp.csr_matrix(adata.X)
        if module.peak_index is not None:
            X = X[:, module.peak_index.numpy()]
        idf, basis = lsi_basis(X, args.d, args.seed)
        module.z_encoder = LSIEncoder(module._make_encoder(args.d), idf, basis)
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
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(row), flush=True)
    append_rows(RESULTS, [row])


if __name__ == "__main__":
    main()
