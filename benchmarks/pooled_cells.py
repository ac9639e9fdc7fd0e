"""The default path at the sizes users have, on cells made from the shared sets' real cells.

No shared labeled set has more than 1,043 cells; the checks at 10,000 cells and more were on
simulated peaks. This script makes a larger labeled set out of a shared one: each new cell
pools the reads of ``--parents`` random cells of one type (the types in their shipped
proportions) and keeps each read with probability ``u / parents``, ``u ~ U(0.4, 1.2)``
(binomial thinning), so its profile is real and its depth varies within its type as real
cells' depths do (0.4-1.2 times a parent's, on average). A parent is shared by about
``parents x cells / shipped cells`` new cells: with two parents, cells that share one are
alike, and the set has structure finer than its types (pairs of cells); with eight, each
parent contributes an eighth and that structure is weak. With ``--keep F`` each read of that
set is kept again with probability ``F``: the same cells, shallower (rows ``<dataset>_keepF``).

Then, one after the other, one thread each, on the same matrix:

- this SCALE's default path (``setup_anndata(adata)``, ``SCALE(adata)``, ``train()``): its
  own clusters, k-means with the true k and Leiden at scanpy's defaults on its latent;
- ``scale_logit`` / ``scale_cloglog``: the same with ``SCALE(adata, atac_link=...)`` (the
  ``logit`` rows of ``scale`` were the default path until the complementary log-log became
  the default; they are stored as ``scale_logit``);
- ``scale_share07`` / ``scale_share_none``: the same with ``setup_anndata(adata,
  min_open_share=0.7)`` / ``min_open_share=None`` (the peaks that hold 70 % of the open
  entries, or the 1 % rule whatever share it holds);
- LSI (``_common.lsi_embedding``): k-means and Leiden;
- SnapATAC2's spectral embedding (``snapatac2_spectral.py``, in
  ``benchmarks/.venv-snapatac2``) when that venv exists: k-means and Leiden.

One row per method and seed goes to ``results/pooled_cells.csv``.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/pooled_cells.py \\
        --dataset forebrain --cells 10000 --parents 2 --seeds 0
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import scipy.sparse as sp
from _common import (
    DATASETS,
    ORIGINAL_N_HIDDEN,
    ROOT,
    SNAPATAC2_PYTHON,
    WORK,
    append_rows,
    embedding_scores,
    label_scores,
    lsi_embedding,
    save_matrix,
    save_readout_inputs,
    thin_reads,
    train_default_path,
)

RESULTS = Path(__file__).resolve().parent / "results" / "pooled_cells.csv"
#: Fixed dropout rates of the ``scale_dropout<tag>`` rows: the row's name and its rate.
DROPOUT_ROWS = {"0": 0.0, "01": 0.1, "0033": 0.033, "0025": 0.025, "002": 0.02}
#: Numbers of LSI coordinates of the rows scale_lsi<n> (SCALE(adata, n_lsi=n)).
LSI_ROWS = (30, 100)


def pooled_cells(
    X: sp.csr_matrix, labels: np.ndarray, n_cells: int, parents: int, seed: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``n_cells`` new cells, each the thinned pool of ``parents`` cells of one type."""
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(X, dtype=np.float32)
    types = labels[rng.choice(len(labels), n_cells)]
    chosen = np.empty((n_cells, parents), dtype=np.int64)
    for t in np.unique(types):
        pool = np.flatnonzero(labels == t)
        if len(pool) < parents:
            raise ValueError(f"type {t!r} has {len(pool)} cells, fewer than --parents {parents}")
        for row in np.flatnonzero(types == t):
            chosen[row] = rng.choice(pool, parents, replace=False)
    pooled = X[chosen[:, 0]]
    for k in range(1, parents):
        pooled = pooled + X[chosen[:, k]]
    pooled = sp.csr_matrix(pooled)
    keep = rng.uniform(0.4, 1.2, size=n_cells) / parents
    return thin_reads(pooled, np.repeat(keep, np.diff(pooled.indptr)), rng), types


def make_set(dataset: str, n_cells: int, parents: int, data_seed: int) -> Path:
    """Write the pooled set as ``.h5ad`` (for the default path) and ``.npz`` (for the
    SnapATAC2 wrapper) under ``work/``; returns the ``.h5ad`` path."""
    import anndata as ad
    import pandas as pd

    from scale_scvi.data import shared_data_path

    stem = WORK / f"pooled_{dataset}_{n_cells}_p{parents}_d{data_seed}"
    h5ad = stem.with_suffix(".h5ad")
    if h5ad.exists():
        return h5ad
    source = shared_data_path(DATASETS[dataset])
    if source is None:
        raise SystemExit(f"{DATASETS[dataset]} not found: set SCALE_SCVI_DATA.")
    shipped = ad.read_h5ad(source)
    labels = shipped.obs["cell_type"].astype(str).to_numpy()
    X, types = pooled_cells(shipped.X, labels, n_cells, parents, data_seed)
    WORK.mkdir(parents=True, exist_ok=True)
    # written under temporary names and renamed: an interrupted run leaves no partial set
    # that a later run (which reuses the set when its .h5ad exists) would read
    partial = stem.with_name(stem.name + ".partial")
    save_matrix(partial.with_suffix(".npz"), X, types)
    os.replace(partial.with_suffix(".npz"), stem.with_suffix(".npz"))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(types)}, index=[f"cell{i}" for i in range(n_cells)]
    )
    ad.AnnData(X, obs=obs, var=shipped.var.copy()).write_h5ad(partial.with_suffix(".h5ad"))
    os.replace(partial.with_suffix(".h5ad"), h5ad)
    return h5ad


def thinned_set(h5ad: Path, keep: float, data_seed: int) -> Path:
    """The pooled set ``h5ad`` with each of its reads kept with probability ``keep``
    (``numpy.random.default_rng([data_seed, 1])``): the same cells, shallower; written as
    ``.h5ad`` and ``.npz`` beside it (under temporary names, then renamed), and returned."""
    import anndata as ad

    name = f"{h5ad.stem}_keep{keep:g}"
    out = h5ad.with_name(name + ".h5ad")
    if out.exists():
        return out
    adata = ad.read_h5ad(h5ad)
    adata.X = thin_reads(
        sp.csr_matrix(adata.X, dtype=np.float32), keep, np.random.default_rng([data_seed, 1])
    )
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    save_matrix(h5ad.with_name(name + ".partial.npz"), adata.X, labels)
    os.replace(h5ad.with_name(name + ".partial.npz"), h5ad.with_name(name + ".npz"))
    adata.write_h5ad(h5ad.with_name(name + ".partial.h5ad"))
    os.replace(h5ad.with_name(name + ".partial.h5ad"), out)
    return out


def run_scale(
    h5ad: Path,
    seed: int,
    model_kwargs: dict | None = None,
    name: str = "scale",
    save_latents: bool = False,
    setup_kwargs: dict | None = None,
) -> dict:
    import torch

    torch.set_num_threads(1)
    adata, model, train_s = train_default_path(
        h5ad, seed, model_kwargs=model_kwargs, setup_kwargs=setup_kwargs
    )
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    own = np.asarray(model.get_cluster_assignments())
    latent = model.get_latent_representation()
    # kept for offline readouts (the partition, the merge) on the same latent
    np.save(WORK / f"{h5ad.stem}_{name}_{seed}_latent.npy", latent)
    if save_latents:
        save_readout_inputs(f"{h5ad.stem}_{name}_{seed}", model, labels, own)
    return {
        **embedding_scores(latent, labels, seed),
        "ari_own": round(label_scores(own, labels)["ari"], 4),
        "n_own": len(np.unique(own)),
        "seconds": round(train_s, 1),
        "epochs": int(model.history["elbo_train"].shape[0]),
    }


def run_lsi(h5ad: Path, seed: int) -> dict:
    import anndata as ad

    adata = ad.read_h5ad(h5ad)
    start = time.perf_counter()
    latent = lsi_embedding(adata.X, seed)
    seconds = time.perf_counter() - start
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    return {**embedding_scores(latent, labels, seed), "seconds": round(seconds, 1)}


def run_snapatac2(h5ad: Path, seed: int) -> dict | None:
    if not SNAPATAC2_PYTHON.exists():
        return None
    import anndata as ad

    out = WORK / f"{h5ad.stem}_snapatac2_{seed}"
    cmd = [str(SNAPATAC2_PYTHON), "benchmarks/snapatac2_spectral.py"]
    cmd += ["--data", str(h5ad.with_suffix(".npz")), "--out", str(out), "--seed", str(seed)]
    start = time.perf_counter()
    threads = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **dict.fromkeys(threads, "1")})
    seconds = time.perf_counter() - start
    labels = ad.read_h5ad(h5ad, backed="r").obs["cell_type"].astype(str).to_numpy()
    latent = np.load(f"{out}_latent.npy")
    return {**embedding_scores(latent, labels, seed), "seconds": round(seconds, 1)}


COLUMNS = [
    "dataset", "cells", "parents", "data_seed", "seed", "method", "ari_own", "n_own",
    "ari_kmeans", "ari_leiden", "n_leiden", "seconds", "epochs", "threads", "date",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--parents", type=int, default=2)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the pooled set")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    parser.add_argument(
        "--keep",
        type=float,
        help="keep each read of the pooled set with this probability (a shallower set of the "
        "same cells); the rows' dataset is then <dataset>_keep<F>",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["scale", "lsi", "snapatac2"],
        choices=[
            "scale", "scale_logit", "scale_cloglog", "scale_hidden1024", "scale_peaks",
            "scale_share07", "scale_share_none",
            *(f"scale_lsi{n}" for n in LSI_ROWS),
            *(f"scale_dropout{tag}" for tag in DROPOUT_ROWS),
            "lsi", "snapatac2",
        ],
    )  # fmt: skip
    parser.add_argument(
        "--save-latents",
        action="store_true",
        help="also store each SCALE run's posterior moments, training cells, labels and own "
        "clusters in work/small_cells/ (read by merge_penalty.py)",
    )
    args = parser.parse_args()

    h5ad = make_set(args.dataset, args.cells, args.parents, args.data_seed)
    if args.keep is not None:
        h5ad = thinned_set(h5ad, args.keep, args.data_seed)
    runners = {
        "scale": run_scale,
        **{
            f"scale_{link}": functools.partial(
                run_scale, model_kwargs={"atac_link": link}, name=f"scale_{link}"
            )
            for link in ("logit", "cloglog")
        },
        # a fixed dropout rate (benchmarks/NOTES.md, "Dropout that fades with the number of cells")
        **{
            f"scale_dropout{tag}": functools.partial(
                run_scale, model_kwargs={"dropout_rate": rate}, name=f"scale_dropout{tag}"
            )
            for tag, rate in DROPOUT_ROWS.items()
        },
        # the encoder of 1024 -> 128 units, the default before 2026-12-06 (late)
        "scale_hidden1024": functools.partial(
            run_scale, model_kwargs={"n_hidden": ORIGINAL_N_HIDDEN}, name="scale_hidden1024"
        ),
        # the encoder reads the peaks (n_lsi=None), or n LSI coordinates
        "scale_peaks": functools.partial(
            run_scale, model_kwargs={"n_lsi": None}, name="scale_peaks"
        ),
        **{
            f"scale_lsi{n}": functools.partial(
                run_scale, model_kwargs={"n_lsi": n}, name=f"scale_lsi{n}"
            )
            for n in LSI_ROWS
        },
        # the peaks that hold 70 % of the open entries where those open in 1 % of the cells
        # hold less (benchmarks/NOTES.md, "Shallow data: the peaks that hold 60 % of the open
        # entries")
        "scale_share07": functools.partial(
            run_scale, setup_kwargs={"min_open_share": 0.7}, name="scale_share07"
        ),
        # the rule before it: the peaks open in 1 % of the cells, whatever share they hold
        "scale_share_none": functools.partial(
            run_scale, setup_kwargs={"min_open_share": None}, name="scale_share_none"
        ),
        "lsi": run_lsi,
        "snapatac2": run_snapatac2,
    }
    if args.save_latents:
        runners = {
            method: (functools.partial(run, save_latents=True) if method[:5] == "scale" else run)
            for method, run in runners.items()
        }
    for seed in args.seeds:
        for method in args.methods:
            result = runners[method](h5ad, seed)
            if result is None:
                print(f"{method}: skipped ({SNAPATAC2_PYTHON} not found)")
                continue
            row = {
                "dataset": args.dataset
                if args.keep is None
                else f"{args.dataset}_keep{args.keep:g}",
                "cells": args.cells,
                "parents": args.parents,
                "data_seed": args.data_seed,
                "seed": seed,
                "method": method,
                **result,
                "threads": 1,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            print(row, flush=True)
            append_rows(RESULTS, [row], COLUMNS)


if __name__ == "__main__":
    main()
