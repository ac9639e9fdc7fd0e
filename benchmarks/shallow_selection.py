"""The default peak selection on shallow data: the 1 % rule alone against its floor.

``setup_anndata`` reads the peaks open in at least 1 % of the cells (at most 50,000), and,
where fewer than ``n_min_peaks`` (10,000) reach 1 %, the 10,000 most often open. The floor
matters on shallow data, whose peaks are each open in few cells. This script makes a shallow
labeled set from a shared one: every open peak of every cell is kept with probability
``--keep`` (binomial thinning of the binarized matrix, one draw, ``--data-seed``), so the
cells keep their types and lose depth. Then, one after the other, one thread each:

- ``default``: ``setup_anndata(adata)``, ``SCALE(adata)``, ``train()``;
- ``no_floor``: the same with ``setup_anndata(adata, n_min_peaks=None)`` (the 1 % rule
  alone, the default before the floor);
- ``lsi``: LSI (``_common.lsi_embedding``) on all peaks of the thinned matrix;
- ``n_min_<N>`` (with ``--floors N ...``): the default path with ``n_min_peaks=N``, to see
  how the result depends on the floor.

Scored as everywhere (k-means with the true k, Leiden at scanpy's defaults, the model's own
clusters). One row per variant and seed goes to ``results/shallow_selection.csv``.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/shallow_selection.py \\
        --dataset forebrain --keep 0.1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import scipy.sparse as sp
from _common import (
    DATASETS,
    WORK,
    append_rows,
    embedding_scores,
    label_scores,
    lsi_embedding,
)

RESULTS = Path(__file__).resolve().parent / "results" / "shallow_selection.csv"
COLUMNS = [
    "dataset", "keep", "data_seed", "seed", "variant", "median_open_peaks", "peaks_at_1pct",
    "peaks_read", "ari_own", "n_own", "ari_kmeans", "ari_leiden", "n_leiden", "seconds",
    "date",
]  # fmt: skip


def thinned(dataset: str, keep: float, data_seed: int):
    """The shared set, binarized, each open peak kept with probability ``keep``."""
    import anndata as ad

    from scale_scvi.data import shared_data_path

    adata = ad.read_h5ad(shared_data_path(DATASETS[dataset]))
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.data[:] = 1.0
    rng = np.random.default_rng(data_seed)
    X.data[rng.random(X.nnz) >= keep] = 0.0
    X.eliminate_zeros()
    out = ad.AnnData(X, obs=adata.obs[["cell_type"]].copy(), var=adata.var[[]].copy())
    return out


def run_scale(adata, seed: int, setup_kwargs: dict) -> dict:
    import scvi
    import torch

    from scale_scvi import SCALE

    torch.set_num_threads(1)
    adata = adata.copy()
    scvi.settings.seed = seed
    SCALE.setup_anndata(adata, **setup_kwargs)
    model = SCALE(adata)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    latent = model.get_latent_representation()
    own = np.asarray(model.get_cluster_assignments())
    return {
        "peaks_read": len(model.selected_peaks_),
        "ari_own": round(label_scores(own, labels)["ari"], 4),
        "n_own": len(np.unique(own)),
        **embedding_scores(latent, labels, seed),
        "seconds": round(seconds, 1),
    }


def run_lsi(adata, seed: int) -> dict:
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    start = time.perf_counter()
    latent = lsi_embedding(adata.X, seed)
    seconds = time.perf_counter() - start
    return {
        "peaks_read": adata.n_vars,
        **embedding_scores(latent, labels, seed),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="forebrain")
    parser.add_argument("--keep", type=float, default=0.1, help="probability a read is kept")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--variants", nargs="*", default=["default", "no_floor", "lsi"],
        choices=["default", "no_floor", "lsi"],
    )  # fmt: skip
    parser.add_argument(
        "--floors", nargs="*", type=int, default=[], help="also n_min_peaks=N, for each N"
    )
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    adata = thinned(args.dataset, args.keep, args.data_seed)
    open_per_cell = np.diff(adata.X.indptr)
    cells_per_peak = np.bincount(adata.X.indices, minlength=adata.n_vars)
    common = {
        "dataset": args.dataset,
        "keep": args.keep,
        "data_seed": args.data_seed,
        "median_open_peaks": int(np.median(open_per_cell)),
        "peaks_at_1pct": int((cells_per_peak >= np.ceil(0.01 * adata.n_obs)).sum()),
    }
    print(common, flush=True)
    runners = {
        "default": lambda seed: run_scale(adata, seed, {}),
        "no_floor": lambda seed: run_scale(adata, seed, {"n_min_peaks": None}),
        "lsi": lambda seed: run_lsi(adata, seed),
    }
    for floor in args.floors:
        setup = {"n_min_peaks": floor}
        runners[f"n_min_{floor}"] = lambda seed, setup=setup: run_scale(adata, seed, setup)
    for seed in args.seeds:
        for variant in [*args.variants, *(f"n_min_{floor}" for floor in args.floors)]:
            row = {**common, "seed": seed, "variant": variant, **runners[variant](seed)}
            row["date"] = time.strftime("%Y-%m-%d %H:%M")
            print(row, flush=True)
            append_rows(RESULTS, [row], COLUMNS)


if __name__ == "__main__":
    main()
