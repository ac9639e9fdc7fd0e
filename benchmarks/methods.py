"""One method on one dataset, in its own process: this SCALE, PeakVI or LSI.

Writes ``<out>.json`` (timings, settings) and ``<out>_latent.npy`` (plus, for SCALE,
``<out>_own.npy``: ``get_cluster_assignments()``, the model's own clusters). The parent
process scores them and reads this process's peak RSS.

``scale`` is the path a user takes: ``SCALE.setup_anndata(adata)``, ``SCALE(adata)``,
``model.train()``, no argument anywhere (whatever the package's defaults are when it runs);
``scale_k`` gives ``n_centroids`` the true number of types and nothing else. PeakVI is
``PEAKVI(adata).train()`` with scvi-tools' defaults. Options (``--max-epochs`` and the like)
exist for the speed runner; the quality runner passes none of them.

Usage (from the repository root)::

    .venv/bin/python benchmarks/methods.py --method scale \
        --data benchmarks/work/forebrain_shipped.npz --out benchmarks/work/scale_forebrain_0 \
        --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from _common import ORIGINAL_N_HIDDEN, load_matrix, lsi_embedding, write_json
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


def _n_epochs(model) -> int:
    """Epochs the last ``train()`` ran, from the logged training ELBO (one row per epoch)."""
    history = getattr(model, "history", None) or {}
    if "elbo_train" in history:
        return len(history["elbo_train"])
    return int(model.trainer.current_epoch)


def _train(model, train_kwargs: dict) -> dict:
    """``model.train(**train_kwargs)``, timed; per-epoch times only when asked for.

    With no ``train_kwargs`` the call is ``model.train()``: nothing is passed, not even a
    callback or a progress-bar switch, so the run is the default path exactly.
    """
    train_kwargs = dict(train_kwargs)
    timer = EpochTimer() if train_kwargs.pop("time_epochs", False) else None
    if timer is not None:
        train_kwargs.update(callbacks=[timer], enable_progress_bar=False)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(**train_kwargs)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    n_epochs = len(timer.times) if timer is not None else _n_epochs(model)
    res = {"train_s": t_train, "train_cpu_s": c_train, "n_epochs": n_epochs}
    if timer is not None:
        res["s_per_epoch"] = float(np.median(timer.times))
        res["cpu_s_per_epoch"] = float(np.median(timer.cpu_times))
        res["epoch_times"] = timer.times
    else:
        res["s_per_epoch"] = t_train / max(n_epochs, 1)
        res["cpu_s_per_epoch"] = c_train / max(n_epochs, 1)
    return res


def _settings(base: str, train_kwargs: dict) -> str:
    shown = {k: v for k, v in train_kwargs.items() if k not in ("time_epochs", "no_outputs")}
    return base + (f", train({shown})" if shown else "")


def run_scale(X, k: int | None, seed: int, out: str, train_kwargs: dict) -> dict:
    """SCALE; ``k=None``: ``SCALE(adata)``, the package's default number of components."""
    import scvi

    from scale_scvi import SCALE

    scvi.settings.seed = seed
    adata = _adata(X)
    SCALE.setup_anndata(adata)
    train_kwargs = dict(train_kwargs)
    no_outputs = train_kwargs.pop("no_outputs", False)
    # the speed comparison gives this SCALE the original's encoder: 1024 -> 128, no batch norm
    model_kwargs = {}
    if train_kwargs.pop("original_encoder", False):
        model_kwargs = {"n_hidden": ORIGINAL_N_HIDDEN, "use_batch_norm": "none"}
    if k is not None:
        model_kwargs["n_centroids"] = k
    model = SCALE(adata, **model_kwargs)
    result = _train(model, train_kwargs)
    t0 = time.perf_counter()
    if not no_outputs:
        np.save(out + "_latent.npy", model.get_latent_representation())
        # codes of the clusters, whether they come as a Categorical or as an array of labels
        own = pd.Categorical(np.asarray(model.get_cluster_assignments()))
        np.save(out + "_own.npy", np.asarray(own.codes))
        # the number of clusters the model reports having found, where it reports one
        n_found = getattr(model, "n_clusters_", None)
        result["n_clusters_reported"] = None if n_found is None else int(n_found)
    result["inference_s"] = time.perf_counter() - t0
    result["n_centroids"] = int(model.module.n_centroids)
    args = ", ".join(f"{a}={v}" for a, v in model_kwargs.items())
    result["settings"] = _settings(f"SCALE(adata{', ' + args if args else ''})", train_kwargs)
    return result


def run_peakvi(X, k: int | None, seed: int, out: str, train_kwargs: dict) -> dict:
    import scvi

    scvi.settings.seed = seed
    adata = _adata(X)
    scvi.model.PEAKVI.setup_anndata(adata)
    model = scvi.model.PEAKVI(adata)
    result = _train(model, train_kwargs)
    t0 = time.perf_counter()
    np.save(out + "_latent.npy", model.get_latent_representation())
    result["inference_s"] = time.perf_counter() - t0
    result["settings"] = _settings("scvi-tools defaults", train_kwargs)
    return result


def run_lsi(X, k: int | None, seed: int, out: str, train_kwargs: dict) -> dict:
    """LSI (:func:`_common.lsi_embedding`) on the values as given."""
    t0, c0 = time.perf_counter(), time.process_time()
    latent = lsi_embedding(X, seed)
    t_fit = time.perf_counter() - t0
    np.save(out + "_latent.npy", latent.astype(np.float32))
    return {
        "train_s": t_fit,
        "train_cpu_s": time.process_time() - c0,
        "inference_s": 0.0,
        "n_epochs": 0,
        "s_per_epoch": float("nan"),
        "cpu_s_per_epoch": float("nan"),
        "settings": "TF-IDF + log1p + SVD (31 comps, first dropped), rows L2-normalized",
    }


def run_scale_default(X, k: int | None, seed: int, out: str, train_kwargs: dict) -> dict:
    """SCALE as a user runs it: the true number of types is not given to the model."""
    return run_scale(X, None, seed, out, train_kwargs)


METHODS = {
    "scale": run_scale_default,
    "scale_k": run_scale,
    "peakvi": run_peakvi,
    "lsi": run_lsi,
}


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
        "--time-epochs", action="store_true", help="time every epoch (a Lightning callback)"
    )
    parser.add_argument(
        "--original-encoder",
        action="store_true",
        help="SCALE with the original's encoder: 1024 -> 128 units, no batch norm",
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
    if args.time_epochs:
        train_kwargs["time_epochs"] = True
    if args.original_encoder:
        train_kwargs["original_encoder"] = True
    result = METHODS[args.method](X, k, args.seed, args.out, train_kwargs)
    result["threads"] = args.threads
    write_json(Path(args.out + ".json"), result)


if __name__ == "__main__":
    main()
