"""Cost of this SCALE as the number of cells grows: synthetic data, 50,000 peaks, ~3 % dense.

For each size the matrix is generated once (a vectorized generator, below, run in the
parent) and stored in ``work/``; one subprocess loads it, trains ``--epochs`` epochs
(seconds per epoch: the median over epochs of the time from the first to the last
minibatch, so the GMM initialization is not counted), then times
inference: the latent (posterior means) and the thresholded imputation
(``get_normalized_accessibility(threshold=0.5)``, CSR). Each phase's peak RSS is read in the
child (``VmHWM`` after the phase, which is the maximum so far), and the whole child's as
the parent polls it (``_common.run_child``). Writes ``results/scaling.csv`` and
``results/scaling.png``.

With ``--accelerator gpu`` the same runs train and infer on one GPU; their rows carry the
device's name and are kept beside the CPU rows (a row is replaced only by a run of the same
size on the same kind of device).

Usage::

    .venv/bin/python benchmarks/run_scaling.py --cells 10000 50000 100000
    .venv/bin/python benchmarks/run_scaling.py --cells 100000 --accelerator gpu
    .venv/bin/python benchmarks/run_scaling.py --cells 20000 --peaks 500000 --density 0.005

With ``--peaks`` above the default selection's cap (50,000, ``setup_anndata``'s
``n_top_peaks``) the run measures the default path on a matrix as large as a raw peak
matrix: ``setup_time_s`` is the registration, which counts the cells of every peak, and
``n_peaks_read`` the peaks the model reads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from _common import (
    MAIN_PYTHON,
    RESULTS,
    WORK,
    cpu_model,
    load_matrix,
    read_json,
    run_child,
    save_matrix,
    vm_hwm_mb,
)

CSV = RESULTS / "scaling.csv"
DENSITY = 0.03


def synthetic_scatac(
    n_cells: int,
    n_peaks: int,
    density: float = 0.03,
    n_types: int = 10,
    seed: int = 0,
    chunk: int = 5000,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary cells x peaks CSR with cell types, about ``density`` of entries open.

    Each type has its own peak propensities (log-normal background, a block of boosted
    type-specific peaks); each cell draws its number of reads around ``density * n_peaks``
    and their peaks from its type's propensities; repeated peaks count once. Cells are drawn
    ``chunk`` at a time, so the generator's memory does not grow with the number of cells.
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, size=n_peaks)
    cdfs = []
    block = n_peaks // (2 * n_types)
    for t in range(n_types):
        p = base.copy()
        p[t * block : (t + 1) * block] *= 20.0
        cdfs.append(np.cumsum(p / p.sum()))
    types = rng.integers(0, n_types, size=n_cells)
    indptrs, indices = [np.zeros(1, dtype=np.int64)], []
    offset = 0
    for start in range(0, n_cells, chunk):
        t_chunk = types[start : start + chunk]
        # a few more reads than the target, so that ~density stay after de-duplication
        reads = rng.poisson(1.15 * density * n_peaks, size=t_chunk.size)
        row_of = np.repeat(np.arange(t_chunk.size, dtype=np.int64), reads)
        cols = np.empty(row_of.size, dtype=np.int64)
        u = rng.random(row_of.size)
        for t in range(n_types):
            sel = t_chunk[row_of] == t
            cols[sel] = np.searchsorted(cdfs[t], u[sel])
        np.minimum(cols, n_peaks - 1, out=cols)
        keys = np.unique(row_of * n_peaks + cols)  # sorted, duplicates removed
        rows, cols = np.divmod(keys, n_peaks)
        counts = np.bincount(rows, minlength=t_chunk.size)
        indptrs.append(offset + np.cumsum(counts))
        indices.append(cols.astype(np.int32))
        offset += keys.size
    indices = np.concatenate(indices)
    X = sp.csr_matrix(
        (np.ones(indices.size, dtype=np.float32), indices, np.concatenate(indptrs)),
        shape=(n_cells, n_peaks),
    )
    return X, types.astype(str)


def dataset_path(n_cells: int, n_peaks: int, density: float = DENSITY) -> Path:
    """The synthetic matrix of this size, generated once (``work/scaling_<cells>x<peaks>.npz``,
    ``..._d<density>.npz`` for a density other than the default)."""
    suffix = "" if density == DENSITY else f"_d{density:g}"
    path = WORK / f"scaling_{n_cells}x{n_peaks}{suffix}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        X, types = synthetic_scatac(n_cells, n_peaks, density=density)
        save_matrix(path, X, types)
    return path


def _rss_mb() -> float:
    """This process's peak RSS so far, MB: ``VmHWM``, which starts afresh at ``exec``.

    ``ru_maxrss`` does not: it carries the size of the parent at the fork, so a child of a
    parent that has just generated a large matrix would report the parent's size.
    """
    hwm = vm_hwm_mb(os.getpid())
    return hwm if hwm > 0 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_name(accelerator: str) -> str:
    """The GPU's name, or the CPU model, that a run on ``accelerator`` uses."""
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_model()


def child(
    n_cells: int,
    n_peaks: int,
    epochs: int,
    out: str,
    accelerator: str = "cpu",
    density: float = DENSITY,
) -> None:
    """Generate, train and infer in this process; write ``out`` (JSON)."""
    import anndata as ad
    import scvi
    from methods import EpochTimer

    from scale_scvi import SCALE

    scvi.settings.seed = 0
    t0 = time.perf_counter()
    X, _ = load_matrix(dataset_path(n_cells, n_peaks, density))
    res = {"n_cells": n_cells, "n_peaks": n_peaks, "density": X.nnz / (n_cells * n_peaks)}
    res["accelerator"], res["device"] = accelerator, device_name(accelerator)
    res["load_s"] = time.perf_counter() - t0
    res["data_mb"] = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20
    res["rss_after_data_mb"] = _rss_mb()
    adata = ad.AnnData(X)
    t0 = time.perf_counter()
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=10)
    res["setup_time_s"] = time.perf_counter() - t0
    res["n_peaks_read"] = len(model.selected_peaks_)
    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=[timer],
        enable_progress_bar=False,
    )
    res["train_total_s"] = time.perf_counter() - t0
    res["train_s_per_epoch"] = float(np.median(timer.times))
    res["train_cpu_s_per_epoch"] = float(np.median(timer.cpu_times))
    res["rss_after_train_mb"] = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    latent = model.get_latent_representation()
    res["latent_s"] = time.perf_counter() - t0
    res["latent_cpu_s"] = time.process_time() - c0
    res["rss_after_latent_mb"] = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    imputed = model.get_normalized_accessibility(threshold=0.5)
    res["impute_s"] = time.perf_counter() - t0
    res["impute_cpu_s"] = time.process_time() - c0
    res["impute_nnz"] = int(imputed.nnz)
    res["rss_after_impute_mb"] = _rss_mb()
    assert latent.shape == (n_cells, 10)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df[(df.accelerator == "cpu") & (df.n_peaks == 50_000)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    n = df.n_cells / 1000
    ax1.plot(n, df.train_cpu_s_per_epoch, "o-", label="training, CPU s / epoch")
    ax1.plot(n, df.latent_cpu_s, "s-", label="latent (posterior means), CPU s")
    ax1.plot(n, df.impute_cpu_s, "^-", label="thresholded imputation, CPU s")
    ax1.set_xlabel("cells (thousands), 50,000 peaks")
    ax1.set_ylabel("CPU seconds (process)")
    ax1.set_title("Time")
    ax1.legend(fontsize=8)
    ax2.plot(n, df.peak_rss_mb / 1024, "o-", label="peak RSS, whole run")
    ax2.plot(n, df.data_mb / 1024, "s--", label="sparse input matrix")
    ax2.plot(n, (df.peak_rss_mb - df.data_mb) / 1024, "^-", label="peak RSS minus input")
    ax2.set_xlabel("cells (thousands), 50,000 peaks")
    ax2.set_ylabel("GiB")
    ax2.set_title("Memory")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", nargs="+", type=int, default=[10_000, 50_000, 100_000])
    parser.add_argument("--peaks", type=int, default=50_000)
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.peaks, args.epochs, args.out, args.accelerator, args.density)
        return
    rows = []
    old = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
    if not old.empty and "accelerator" not in old:
        old["accelerator"] = "cpu"
    for n in args.cells:
        out = WORK / f"scaling_{n}x{args.peaks}_{args.accelerator}.json"
        t0 = time.perf_counter()
        dataset_path(n, args.peaks, args.density)
        print(f"{n} cells: data ready in {time.perf_counter() - t0:.0f} s", flush=True)
        cmd = [MAIN_PYTHON, "benchmarks/run_scaling.py", "--child", str(n)]
        cmd += ["--peaks", str(args.peaks), "--epochs", str(args.epochs), "--out", str(out)]
        cmd += ["--accelerator", args.accelerator, "--density", str(args.density)]
        usage = run_child(cmd, WORK / "logs" / f"scaling_{n}_{args.accelerator}.log")
        if usage["returncode"] != 0:
            print(f"{n} cells failed; see work/logs", file=sys.stderr)
            continue
        row = read_json(out)
        row["peak_rss_mb"] = usage["peak_rss_mb"]
        row["wall_s"] = usage["wall_s"]
        row["epochs"] = args.epochs
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    if not old.empty:
        replaced = (
            old.n_cells.isin(df.n_cells)
            & (old.n_peaks == args.peaks)
            & (old.accelerator == args.accelerator)
        )
        df = pd.concat([old[~replaced], df], ignore_index=True)
    df = df.sort_values(["accelerator", "n_peaks", "n_cells"], kind="stable")
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(CSV, index=False)
    plot(df, RESULTS / "scaling.png")


if __name__ == "__main__":
    main()
