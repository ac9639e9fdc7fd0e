"""Search for the defaults of the path a user runs: raw peak matrix, no K, the model's clusters.

Each run trains SCALE on a shared labeled dataset *as shipped* (every peak, counts or
binary) in its own process with one torch thread, and appends one row to
``results/defaults_search.csv``: the number of clusters the model found, the ARI/NMI of its
own cluster assignments, of k-means with the true k and of Leiden (scanpy's default
resolution) on its latent, and the wall time. ``--method lsi`` scores the LSI baseline the
same way (k-means with the true k, Leiden at the default resolution).

Usage (from the repository root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/defaults_search.py --dataset forebrain \\
        --config defaults --seed 0

``--cells N`` trains on the random subset of ``N`` cells that ``small_cells.py`` draws.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from _common import DATASETS, ORIGINAL_N_HIDDEN, append_rows, freeze_pre_norm_biases

RESULTS = Path(__file__).resolve().parent / "results" / "defaults_search.csv"

# Each configuration: the arguments of setup_anndata, SCALE(...) and train() that differ
# from the library's defaults (an empty dict is the default path), and for the runs made
# before feature selection was part of the model, the open-fraction threshold applied to
# the matrix by this script.
CONFIGS: dict[str, dict] = {
    # "defaults" (no entry): setup_anndata(adata), SCALE(adata), train(), nothing else.
    "k_true": {"model": {"n_centroids": "true"}},
    "all_peaks": {"setup": {"min_fraction": None, "n_top_peaks": None}},
    "min_fraction_1pct": {"setup": {"min_fraction": 0.01}},
    "steps2000": {"train": {"n_steps": 2000}},
    "steps3000": {"train": {"n_steps": 3000}},
    "steps6000": {"train": {"n_steps": 6000}},
    # the encoder: 256 -> 128 units (the default since 2026-12-06, late; its earlier rows were
    # measured against 1024 -> 128), and the original SCALE's 1024 -> 128
    "hidden256": {"model": {"n_hidden": [256, 128]}},
    "hidden1024": {"model": {"n_hidden": list(ORIGINAL_N_HIDDEN)}},
    "latent20": {"model": {"n_latent": 20}},
    "batch64_steps2000": {"train": {"batch_size": 64, "n_steps": 2000}},
    "batch128_steps1000": {"train": {"batch_size": 128, "n_steps": 1000}},
    "lr_cosine": {"lr_schedule": "cosine"},  # see _cosine_lr_decay
    # the networks' weights read at the end as an exponential moving average of their
    # trajectory (decay per optimizer step; the prior's parameters as trained; see
    # _weight_average)
    "ema_0998": {"ema": 0.998},
    "ema_0995": {"ema": 0.995},
    "ema_09995": {"ema": 0.9995},
    # the KL term's weight rising to 0.5 (or 0.75) instead of 1 over the warm-up, and kept there
    "max_kl_05": {"train": {"plan_kwargs": {"max_kl_weight": 0.5}}},
    "max_kl_075": {"train": {"plan_kwargs": {"max_kl_weight": 0.75}}},
    # the encoders' linear biases that batch norm follows kept at their initial values (see
    # _common.freeze_pre_norm_biases)
    "frozen_pre_norm_biases": {"freeze_pre_norm_biases": True},
    # the encoder's normalization: none (the original's encoder) or layer norm per cell
    "norm_none": {"model": {"use_batch_norm": "none"}},
    "layer_norm": {"model": {"use_batch_norm": "none", "use_layer_norm": "encoder"}},
    # each peak's Bernoulli term weighted by log(1 + n_cells / cells open), normalized to a
    # mean of 1 over the peaks read (a patch of the ATAC module's likelihood; see _idf_patch)
    "likelihood_idf": {"likelihood_idf": True},
    # the mixture's first fit (end of the KL warm-up) read off Leiden at resolution 0.5, the
    # fit when training ends at the default resolution 1 (see _init_resolution_patch)
    "init_resolution_05": {"init_resolution": 0.5},
    # the same at resolution 2: more, smaller pieces before the merge at the first fit
    "init_resolution_2": {"init_resolution": 2.0},
    # the first fit's Leiden pieces taken as the components without the merge; the fit when
    # training ends as in the package (see _first_fit_unmerged_patch)
    "first_fit_unmerged": {"first_fit_unmerged": True},
    # inverted dropout of the encoder's input peaks during training (the multimodal module's
    # input_dropout, set on the ATAC module's encoder)
    "input_dropout_02": {"input_dropout": 0.2},
    # both mixture fits (end of the KL warm-up, end of training) take the number of
    # components from the Leiden partition merged by BIC, and the partition itself from
    # k-means with that number (see _kmeans_at_leiden_k_patch)
    "kmeans_at_leiden_k": {"kmeans_at_leiden_k": "both"},
    # the same for the first fit only; the fit when training ends as in the package
    "first_fit_kmeans_at_leiden_k": {"kmeans_at_leiden_k": "first"},
    # AdamW's decoupled weight decay on the networks' parameters raised from 5e-4 (lr x decay
    # = 1.5e-6 per step: a 0.6 % shrink over 4,000 steps) to 0.05 / 0.2; the prior's
    # parameters keep 5e-4 (see _nets_weight_decay_patch)
    "nets_weight_decay_005": {"nets_weight_decay": 0.05},
    "nets_weight_decay_02": {"nets_weight_decay": 0.2},
    # the same on the decoder's parameters only (peaks x latent weights and a bias per peak,
    # what fits the training cells on a few hundred cells); the rest keeps 5e-4
    "decoder_weight_decay_005": {"decoder_weight_decay": 0.05},
    "decoder_weight_decay_02": {"decoder_weight_decay": 0.2},
    "decoder_weight_decay_01": {"decoder_weight_decay": 0.1},
    "decoder_weight_decay_006": {"decoder_weight_decay": 0.06},
    # both mixture fits merge only the clusters that the neighbour graph joins at least 0.7
    # times as often as a random graph of the same degrees (merge_penalty.py's graph0.7; see
    # _merge_graph_patch); alone, and with the peaks that hold 70 % of the open entries of
    # forebrain at half its reads (--cells 1043 --keep 0.5)
    "merge_graph_07": {"merge_graph": 0.7},
    "peaks70_merge_graph_07": {"setup": {"n_min_peaks": 43_200}, "merge_graph": 0.7},
}


def _leiden(latent: np.ndarray, seed: int) -> np.ndarray:
    """Leiden at scanpy's default resolution on the 15-nearest-neighbour graph of latent."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.zeros((latent.shape[0], 0), dtype=np.float32))
    a.obsm["X"] = np.asarray(latent, dtype=np.float32)
    sc.pp.neighbors(a, use_rep="X", random_state=seed)
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return a.obs["leiden"].to_numpy()


def _scores(prefix: str, pred: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        f"ari_{prefix}": round(float(adjusted_rand_score(labels, pred)), 4),
        f"nmi_{prefix}": round(float(normalized_mutual_info_score(labels, pred)), 4),
        f"n_{prefix}": len(np.unique(pred)),
    }


def _latent_scores(latent: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    from sklearn.cluster import KMeans

    k = len(np.unique(labels))
    kmeans = KMeans(n_clusters=k, n_init=20, random_state=seed).fit_predict(latent)
    out = _scores("kmeans", kmeans, labels)
    out.update(_scores("leiden", _leiden(latent, seed), labels))
    return out


def run_lsi(adata, seed: int) -> dict:
    """TF-IDF + SVD (31 components, first dropped), rows L2-normalized, as in methods.py."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    X = sp.csr_matrix(adata.X)
    X.data = (X.data > 0).astype(np.float64)
    t0 = time.perf_counter()
    tf = sp.diags(1.0 / np.maximum(np.asarray(X.sum(1)).ravel(), 1)) @ X
    idf = X.shape[0] / np.maximum(np.asarray(X.sum(0)).ravel(), 1)
    tfidf = (tf @ sp.diags(idf)).tocsr()
    tfidf.data = np.log1p(1e4 * tfidf.data)
    svd = TruncatedSVD(31, random_state=seed).fit_transform(tfidf)[:, 1:]
    latent = svd / np.linalg.norm(svd, axis=1, keepdims=True)
    return {"latent": latent, "train_s": time.perf_counter() - t0}


def _cosine_lr_decay():
    """Callback: the learning rate decayed by a cosine from the end of the KL warm-up (a
    quarter of the epochs, the default) to 0 at the last epoch."""
    import math

    from lightning.pytorch.callbacks import Callback

    class CosineLrDecay(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            warm = max(1, trainer.max_epochs // 4)
            t = max(0.0, (trainer.current_epoch - warm) / max(1, trainer.max_epochs - warm))
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group.setdefault("initial_lr", group["lr"])
                    group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * t))

    return CosineLrDecay()


def _weight_average(decay: float):
    """Callback: an exponential moving average of the networks' parameters (every module
    parameter but the prior's), updated after each optimizer step and copied into the
    networks when training ends, before the mixture's final fit reads the latent."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class WeightAverage(Callback):
        def _params(self, pl_module):
            return [
                p
                for name, p in pl_module.module.named_parameters()
                if not name.startswith("prior.") and p.requires_grad
            ]

        def on_train_start(self, trainer, pl_module):
            self.shadow = [p.detach().clone() for p in self._params(pl_module)]

        @torch.no_grad()
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for s, p in zip(self.shadow, self._params(pl_module)):
                s.lerp_(p.detach(), 1.0 - decay)

        @torch.no_grad()
        def on_train_end(self, trainer, pl_module):
            for s, p in zip(self.shadow, self._params(pl_module)):
                p.copy_(s)

    return WeightAverage()


def _idf_patch(adata, module) -> None:
    """Weight each peak's term of the ATAC module's Bernoulli log-likelihood by its inverse
    document frequency, ``log(1 + n_cells / cells open)``, normalized to a mean of 1."""
    import torch
    from torch.nn import functional as F

    import scale_scvi.module._scalevae as scalevae
    from scale_scvi.module._feature_stats import open_fraction

    fraction = open_fraction(adata.X)
    if module.peak_index is not None:
        fraction = fraction[module.peak_index.numpy()]
    idf = np.log1p(1.0 / np.maximum(fraction, 1.0 / adata.n_obs))
    weight = torch.as_tensor(idf / idf.mean(), dtype=torch.float32)

    def weighted(logits, x):
        dense = x.to_dense() if x.layout != torch.strided else x
        dense = (dense > 0).to(logits.dtype)
        return (weight * (dense * logits - F.softplus(logits))).sum(-1)

    scalevae.bernoulli_log_likelihood = weighted


def _init_resolution_patch(resolution: float) -> None:
    """Make the mixture's first fit (at the end of the KL warm-up) use ``resolution``; the
    fit when training ends keeps the callback's own resolution."""
    from scale_scvi.train._gmm_init import GMMInitCallback

    start = GMMInitCallback.on_train_epoch_start

    def patched(self, trainer, pl_module):
        default, self.resolution = self.resolution, resolution
        try:
            start(self, trainer, pl_module)
        finally:
            self.resolution = default

    GMMInitCallback.on_train_epoch_start = patched


def _merge_graph_patch(threshold: float) -> None:
    """Make both mixture fits merge as ``merge_penalty.merge_variant(graph=threshold)``: the
    package's merge, only between clusters that the neighbour graph joins often enough."""
    from merge_penalty import merge_variant

    from scale_scvi.train import _gmm_init as gmm

    def patched(latent, labels, sample_weight=None, reg_covar=1e-4, criterion="icl", **_):
        weight = np.ones(len(latent)) if sample_weight is None else np.asarray(sample_weight)
        return merge_variant(latent, labels, weight, graph=threshold)

    gmm.merge_partition = patched


def _first_fit_unmerged_patch() -> None:
    """Make the mixture's first fit (at the end of the KL warm-up) keep every Leiden piece
    as a component (no merge); the fit when training ends merges as the package does."""
    from scale_scvi.train import _gmm_init as gmm

    start = gmm.GMMInitCallback.on_train_epoch_start

    def patched(self, trainer, pl_module):
        merge = gmm.merge_partition
        gmm.merge_partition = lambda latent, labels, *args, **kwargs: gmm._by_size(labels)
        try:
            start(self, trainer, pl_module)
        finally:
            gmm.merge_partition = merge

    gmm.GMMInitCallback.on_train_epoch_start = patched


def _kmeans_at_leiden_k_patch(which: str) -> None:
    """Make the Leiden-read mixture fits (``which``: "both", or the "first" one only) k-means
    fits with as many components as the Leiden partition has once merged
    (``fit_gmm(method="leiden")`` counts, k-means cuts)."""
    from scale_scvi.train import _gmm_init as gmm

    fit = gmm.fit_gmm
    calls = []

    def patched(
        latent,
        n_components,
        seed=0,
        max_cells=50_000,
        posterior_var=None,
        method="kmeans",
        sample_weight=None,
        resolution=1.0,
    ):
        calls.append(method)
        if method == "leiden" and (which == "both" or len(calls) == 1):
            x = np.asarray(latent, dtype=np.float64)
            labels = gmm.leiden_partition(x, n_components, seed=seed, resolution=resolution)
            labels = gmm.merge_partition(x, labels, sample_weight, 1e-4)
            n_components, method = int(labels.max()) + 1, "kmeans"
        return fit(
            latent, n_components, seed, max_cells, posterior_var, method, sample_weight, resolution
        )

    gmm.fit_gmm = patched


def _nets_weight_decay_patch(weight_decay: float, decoder_only: bool = False) -> None:
    """Make ``train``'s optimizer decay the networks' parameters (``decoder_only``: the
    decoder's) by ``weight_decay`` and the others by the ``weight_decay`` given to ``train``
    (two parameter groups)."""
    from scale_scvi.model import _scale
    from scale_scvi.train import FusedAdamW

    def patched(module, params, **kwargs):
        params = list(params)
        decayed = {id(p) for p in (module.decoder if decoder_only else module).parameters()}
        decayed -= {id(p) for p in module.prior.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in decayed]},
            {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        ]
        return FusedAdamW(
            groups,
            in_place_layers=module.in_place_layers(),
            clip_apart=module.separately_clipped_parameters(),
            **kwargs,
        )

    _scale._make_optimizer = patched


def run_scale(adata, seed: int, config: dict) -> dict:
    import scvi
    import torch

    from scale_scvi import SCALE

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    model_kwargs = dict(config.get("model", {}))
    if model_kwargs.get("n_centroids") == "true":
        model_kwargs["n_centroids"] = int(adata.obs["cell_type"].nunique())
    train_kwargs = dict(config.get("train", {}))
    if "n_steps" in train_kwargs:
        from scale_scvi.model._scale import default_max_epochs

        defaults = inspect.signature(SCALE.train).parameters
        train_kwargs["max_epochs"] = default_max_epochs(
            adata.n_obs,
            train_kwargs.get("train_size", defaults["train_size"].default),
            train_kwargs.get("batch_size", defaults["batch_size"].default),
            n_steps=train_kwargs.pop("n_steps"),
        )
    if config.get("lr_schedule") == "cosine":
        train_kwargs["callbacks"] = [_cosine_lr_decay()]
    if "ema" in config:
        train_kwargs["callbacks"] = [_weight_average(float(config["ema"]))]
    if config.get("kmeans_at_leiden_k"):
        _kmeans_at_leiden_k_patch(config["kmeans_at_leiden_k"])
    if "init_resolution" in config:
        _init_resolution_patch(config["init_resolution"])
    if config.get("first_fit_unmerged"):
        _first_fit_unmerged_patch()
    if "merge_graph" in config:
        _merge_graph_patch(config["merge_graph"])
    if "nets_weight_decay" in config:
        _nets_weight_decay_patch(config["nets_weight_decay"])
    if "decoder_weight_decay" in config:
        _nets_weight_decay_patch(config["decoder_weight_decay"], decoder_only=True)
    SCALE.setup_anndata(adata, **config.get("setup", {}))
    model = SCALE(adata, **model_kwargs)
    if config.get("input_dropout"):
        model.module.z_encoder.input_dropout = float(config["input_dropout"])
    if config.get("likelihood_idf"):
        _idf_patch(adata, model.module)
    if config.get("freeze_pre_norm_biases") and not freeze_pre_norm_biases(model.module):
        raise RuntimeError("No linear layer followed by batch norm was found.")
    t0 = time.perf_counter()
    model.train(**train_kwargs)
    train_s = time.perf_counter() - t0
    own = model.get_cluster_assignments()
    return {
        "latent": model.get_latent_representation(),
        "own": np.asarray(own).astype(str),
        "train_s": train_s,
        "n_epochs": int(model.history["elbo_train"].shape[0]),
        "n_peaks_used": len(model.selected_peaks_),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--config", default="defaults")
    parser.add_argument("--method", choices=["scale", "lsi"], default="scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cells",
        type=int,
        help="train on small_cells.py's random subset of this many cells (drawn with --seed); "
        "the row's dataset is then <dataset>_<cells>",
    )
    parser.add_argument(
        "--keep",
        type=float,
        help="with --cells: small_cells.py's shallower copy of that subset (each read kept "
        "with this probability); the row's dataset is then <dataset>_keep<F>_<cells>",
    )
    args = parser.parse_args()

    import anndata as ad

    from scale_scvi.data import shared_data_path

    path = shared_data_path(DATASETS[args.dataset])
    if path is None:
        raise SystemExit(f"{DATASETS[args.dataset]} not found: set SCALE_SCVI_DATA.")
    if args.cells is not None:
        from small_cells import subset

        path = subset(args.dataset, args.cells, args.seed, args.keep)
    elif args.keep is not None:
        parser.error("--keep needs --cells")
    adata = ad.read_h5ad(path)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    t0 = time.perf_counter()
    if args.method == "lsi":
        out, config = run_lsi(adata, args.seed), {}
    else:
        config = CONFIGS.get(args.config, {}) if args.config != "defaults" else {}
        out = run_scale(adata, args.seed, config)
    row = {
        "dataset": args.dataset
        if args.cells is None
        else f"{args.dataset}{'' if args.keep is None else f'_keep{args.keep}'}_{args.cells}",
        "method": args.method,
        "config": args.config if args.method == "scale" else "lsi",
        "seed": args.seed,
        "settings": json.dumps(config, sort_keys=True),
    }
    if "own" in out:
        row.update(_scores("own", out["own"], labels))
    else:
        row.update({"ari_own": "", "nmi_own": "", "n_own": ""})
    row.update(_latent_scores(out["latent"], labels, args.seed))
    row.update(
        {
            "train_s": round(out["train_s"], 1),
            "wall_s": round(time.perf_counter() - t0, 1),
            "n_epochs": out.get("n_epochs", ""),
            "n_peaks_used": out.get("n_peaks_used", adata.n_vars),
            "threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    )
    print(json.dumps(row))
    append_rows(RESULTS, [row])


if __name__ == "__main__":
    main()
