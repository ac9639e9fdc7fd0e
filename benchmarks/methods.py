"""One method on one dataset, in its own process: this SCALE, PeakVI or LSI.

Writes ``<out>.json`` (timings, settings) and ``<out>_latent.npy`` (plus ``<out>_gmm.npy``,
the argmax of the cluster probabilities, for SCALE). The parent process scores them and
reads this process's peak RSS.

Usage (from the repository root)::

    .venv/bin/python benchmarks/methods.py --method scale --data benchmarks/work/forebrain.npz \
        --out benchmarks/work/scale_forebrain_0 --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _common import load_matrix, write_json
from lightning.pytorch.callbacks import Callback


class EpochTimer(Callback):
    """Lightning callback recording the wall and CPU time of every training epoch.

    From the start of the first minibatch to the end of the epoch, so work done by other
    callbacks at the start of an epoch (the GMM initialization) is not counted. CPU time is
    that of the whole process (all threads), which a busy machine inflates much less than
    wall time.
    """

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)
        self._t0 = None


def _adata(X: sp.csr_matrix):
    import anndata as ad

    return ad.AnnData(X)


def run_scale(X, k: int, seed: int, out: str, train_kwargs: dict) -> dict:
    import scvi

    from scale_scvi import SCALE

    scvi.settings.seed = seed
    adata = _adata(X)
    SCALE.setup_anndata(adata)
    no_outputs = train_kwargs.pop("no_outputs", False)
    # the original's encoder has no batch norm: the speed comparison turns it off
    model_kwargs = {"use_batch_norm": "none"} if train_kwargs.pop("no_batch_norm", False) else {}
    model = SCALE(adata, n_centroids=k, **model_kwargs)
    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(callbacks=[timer], enable_progress_bar=False, **train_kwargs)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not no_outputs:
        latent = model.get_latent_representation()
        gmm = model.get_cluster_probabilities().argmax(1)
        np.save(out + "_latent.npy", latent)
        np.save(out + "_gmm.npy", gmm)
    t_inf = time.perf_counter() - t0
    return {
        "train_s": t_train,
        "inference_s": t_inf,
        "n_epochs": len(timer.times),
        "s_per_epoch": float(np.median(timer.times)),
        "cpu_s_per_epoch": float(np.median(timer.cpu_times)),
        "epoch_times": timer.times,
        "settings": f"defaults, n_centroids={k}" + (f", {train_kwargs}" if train_kwargs else ""),
    }


def run_peakvi(X, k: int, seed: int, out: str, train_kwargs: dict) -> dict:
    import scvi

    scvi.settings.seed = seed
    adata = _adata(X)
    scvi.model.PEAKVI.setup_anndata(adata)
    model = scvi.model.PEAKVI(adata)
    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(callbacks=[timer], enable_progress_bar=False, **train_kwargs)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    latent = model.get_latent_representation()
    t_inf = time.perf_counter() - t0
    np.save(out + "_latent.npy", latent)
    return {
        "train_s": t_train,
        "inference_s": t_inf,
        "n_epochs": len(timer.times),
        "s_per_epoch": float(np.median(timer.times)),
        "cpu_s_per_epoch": float(np.median(timer.cpu_times)),
        "settings": "scvi-tools defaults" + (f", {train_kwargs}" if train_kwargs else ""),
    }


def run_lsi(X, k: int, seed: int, out: str, train_kwargs: dict) -> dict:
    """TF-IDF, log1p, truncated SVD with 30 kept components (the first, depth, dropped),
    rows L2-normalized (the cosine geometry LSI is usually clustered in)."""
    from sklearn.decomposition import TruncatedSVD

    t0 = time.perf_counter()
    X = sp.csr_matrix(X, dtype=np.float64)
    tf = sp.diags(1.0 / np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)) @ X
    idf = X.shape[0] / np.maximum(np.asarray(X.sum(0)).ravel(), 1.0)
    tfidf = (tf @ sp.diags(idf)).tocsr()
    tfidf.data = np.log1p(tfidf.data * 1e4)
    svd = TruncatedSVD(n_components=31, random_state=seed, algorithm="randomized", n_iter=7)
    latent = svd.fit_transform(tfidf)[:, 1:]
    latent /= np.maximum(np.linalg.norm(latent, axis=1, keepdims=True), 1e-12)
    t_fit = time.perf_counter() - t0
    np.save(out + "_latent.npy", latent.astype(np.float32))
    return {
        "train_s": t_fit,
        "inference_s": 0.0,
        "n_epochs": 0,
        "s_per_epoch": float("nan"),
        "cpu_s_per_epoch": float("nan"),
        "settings": "TF-IDF + log1p + SVD (31 comps, first dropped), rows L2-normalized",
    }


METHODS = {"scale": run_scale, "peakvi": run_peakvi, "lsi": run_lsi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--minibatches",
        choices=["default", "sparse", "dense"],
        default="default",
        help="SCALE's load_sparse_tensor: its default (sparse on the CPU), True or False",
    )
    parser.add_argument("--no-outputs", action="store_true", help="timing only")
    parser.add_argument(
        "--no-batch-norm", action="store_true", help="SCALE without batch norm (the original's)"
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    X, labels = load_matrix(args.data)
    k = len(np.unique(labels))
    train_kwargs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    if args.batch_size is not None:
        train_kwargs["batch_size"] = args.batch_size
    if args.minibatches != "default":
        train_kwargs["load_sparse_tensor"] = args.minibatches == "sparse"
    if args.no_outputs:
        train_kwargs["no_outputs"] = True
    if args.no_batch_norm:
        train_kwargs["no_batch_norm"] = True
    result = METHODS[args.method](X, k, args.seed, args.out, train_kwargs)
    write_json(Path(args.out + ".json"), result)


if __name__ == "__main__":
    main()
