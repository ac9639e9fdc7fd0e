"""Clustering quality of this SCALE and its peers on the labeled sets, as a user runs them.

Every method gets the matrix as shipped (``work/<dataset>_shipped.npz``: all peaks, the
values of the file: binary for forebrain, counts for the cell lines), with no selection of
peaks by hand; whatever a method selects, it selects itself.

- ``scale``: ``SCALE.setup_anndata(adata)``, ``SCALE(adata)``, ``model.train()``: no argument
  anywhere, so the row measures whatever the package's defaults are when it runs;
- ``scale_k``: the same with ``n_centroids`` = the true number of types;
- ``peakvi``: ``PEAKVI(adata).train()``, scvi-tools' defaults;
- ``lsi``: TF-IDF, log1p, truncated SVD (``methods.py``);
- ``snapatac2``: ``snapatac2==2.9.0`` in ``benchmarks/.venv-snapatac2``,
  ``pp.select_features`` + ``tl.spectral`` with their defaults (``snapatac2_spectral.py``);
- ``original``: ``scale==1.1.2`` in ``benchmarks/.venv-scale`` (``original_scale.py``),
  capped at 3,000 iterations.

Each (dataset, method, seed) runs in its own subprocess with one thread (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``RAYON_NUM_THREADS`` = 1 and ``torch.set_num_threads(1)``), one after
the other. This process reads the child's wall time, CPU time and peak RSS and scores its
embedding the same way for every method: k-means with the true k (``n_init=20``) and Leiden
at scanpy's defaults (``sc.pp.neighbors`` on the embedding, ``sc.tl.leiden``, resolution
1.0), ARI and NMI each; for the two SCALEs also the model's own clusters
(``get_cluster_assignments()``), for the original SCALE the argmax of its ``get_gamma``.
Rows go to ``results/quality_shipped.csv``; rows already there are kept (``--redo`` runs
them again), so the runner can be resumed, and a child whose outputs are already in
``work/shipped/`` is scored without being run again. Progress goes to
``work/shipped/progress.log``.

Usage::

    .venv/bin/python benchmarks/run_quality.py --datasets cell_lines forebrain --seeds 0 1 2
    # only this SCALE's rows, again (e.g. after its defaults changed):
    .venv/bin/python benchmarks/run_quality.py --methods scale scale_k --redo
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _common import (
    MAIN_PYTHON,
    ORIGINAL_PYTHON,
    RESULTS,
    SNAPATAC2_PYTHON,
    WORK,
    cluster_scores,
    ensure_original_venv,
    ensure_snapatac2_venv,
    label_scores,
    leiden_scores,
    load_matrix,
    prepare_dataset,
    read_json,
    run_child,
    write_json,
)

SCALE_METHODS = ["scale", "scale_k"]
PEERS = ["peakvi", "lsi", "snapatac2", "original"]
METHODS = SCALE_METHODS + PEERS
CSV = RESULTS / "quality_shipped.csv"
OUT_DIR = WORK / "shipped"
THREADS = 1
THREAD_ENV = {
    var: str(THREADS)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")
}

# CPU-budget caps. The original SCALE: iterations of its fit loop at its batch size of 64
# (its default is 30,000: 1.8 h per run on the cell lines, 0.22 CPU-s per iteration).
# PeakVI on all 140,102 forebrain peaks: about 22 CPU-s per epoch at one thread, and its
# default (up to 500 epochs, early stopping with patience 50 on a 10 % validation split) ran
# 204-234 epochs on 17,349 of these peaks: 75-85 CPU-minutes a run, hours of wall time on a
# shared 2-core machine. Capped at 20 epochs, it gives the per-epoch time and a lower bound
# of its default's time (early stopping cannot stop before epoch 51), not its quality.
CAPS = {
    ("original", "cell_lines"): {"max_iter": 3000},
    ("original", "forebrain"): {"max_iter": 3000},
    ("peakvi", "forebrain"): {"max_epochs": 20},
}
# capped so short that the scores are not the method's: left out of the targets' comparisons
NOT_CONVERGED = {("peakvi", "forebrain")}


def log(msg: str) -> None:
    """Print ``msg`` and append it, time-stamped, to ``work/shipped/progress.log``."""
    line = f"{dt.datetime.now().strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "progress.log", "a") as fh:
        fh.write(line + "\n")


def command(method: str, data: str, out: str, seed: int, dataset: str) -> list[str]:
    common = ["--data", data, "--out", out, "--seed", str(seed)]
    if method == "original":
        cmd = [str(ORIGINAL_PYTHON), "benchmarks/original_scale.py", *common]
        cmd += ["--threads", str(THREADS)]
        if "max_iter" in CAPS.get((method, dataset), {}):
            cmd += ["--max-iter", str(CAPS[method, dataset]["max_iter"])]
        return cmd
    if method == "snapatac2":
        return [str(SNAPATAC2_PYTHON), "benchmarks/snapatac2_spectral.py", *common]
    cmd = [MAIN_PYTHON, "benchmarks/methods.py", "--method", method, *common]
    if "max_epochs" in CAPS.get((method, dataset), {}):
        cmd += ["--max-epochs", str(CAPS[method, dataset]["max_epochs"])]
    return [*cmd, "--threads", str(THREADS)]


def input_description(X) -> str:
    binary = bool(np.all(X.data == 1))
    return f"as shipped: {X.shape[1]:,} peaks, {'binary' if binary else 'counts'}"


def run_one(dataset: str, method: str, seed: int, redo: bool, run: bool = True) -> dict | None:
    """Run one child (unless its outputs exist and not ``redo``) and score it; ``run=False``
    only scores outputs that exist."""
    data = prepare_dataset(dataset, binarize=False)
    if data is None:
        log(f"skip {dataset}: not in the shared data folder")
        return None
    X, labels = load_matrix(data)
    out = str(OUT_DIR / f"{method}_{dataset}_{seed}")
    usage_file = Path(out + "_usage.json")
    have = all(Path(out + s).exists() for s in (".json", "_latent.npy")) and usage_file.exists()
    if not run and not have:
        return None
    if redo or not have:
        log(f"run   {dataset} {method} seed {seed}")
        load_before = os.getloadavg()[0]
        usage = run_child(
            command(method, str(data), out, seed, dataset),
            OUT_DIR / "logs" / f"{method}_{dataset}_{seed}.log",
            env_extra=THREAD_ENV,
        )
        if usage["returncode"] != 0:
            log(f"FAIL  {dataset} {method} seed {seed}; see work/shipped/logs")
            return None
        # how busy the machine was: the 1-minute load average at the start and the end
        usage["load_avg"] = (load_before + os.getloadavg()[0]) / 2
        write_json(usage_file, usage)
    else:
        log(f"score {dataset} {method} seed {seed} (outputs of an earlier run)")
        usage = read_json(usage_file)
    info = read_json(Path(out + ".json"))
    latent = np.load(out + "_latent.npy")
    km = cluster_scores(latent, labels, seed=0)
    ld = leiden_scores(latent, labels)
    row = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "input": input_description(X),
        "k_true": len(np.unique(labels)),
        "ari_kmeans": km["ari"],
        "nmi_kmeans": km["nmi"],
        "ari_leiden": ld["ari"],
        "nmi_leiden": ld["nmi"],
        "n_leiden": ld["n_clusters"],
        "leiden_knn": ld["knn"],
        "ari_own": np.nan,
        "nmi_own": np.nan,
        "n_own": np.nan,
        "n_centroids": info.get("n_centroids", np.nan),
        "n_clusters_reported": info.get("n_clusters_reported", np.nan),
        "wall_s": usage["wall_s"],
        "cpu_s": usage["cpu_s"],
        "train_s": info["train_s"],
        # the original's wrapper wrote only the per-epoch CPU time before
        "train_cpu_s": info.get(
            "train_cpu_s", info.get("cpu_s_per_epoch", np.nan) * info.get("n_epochs", np.nan)
        ),
        "n_epochs": info.get("n_epochs", np.nan),
        "s_per_epoch": info.get("s_per_epoch", np.nan),
        # the child's own peak (VmHWM) where run_child read it; older runs: ru_maxrss, which
        # includes this runner's size at the fork
        "peak_rss_mb": usage["peak_rss_mb"] if "peak_rss_mb_rusage" in usage else np.nan,
        "load_avg": usage.get("load_avg", np.nan),
        "threads": THREADS,
        "in_targets": (method, dataset) not in NOT_CONVERGED,
        "settings": info.get("settings", ""),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }
    own_file = {"scale": "_own.npy", "scale_k": "_own.npy", "original": "_gmm.npy"}.get(method)
    if own_file is not None:
        own = np.load(out + own_file)
        sc = label_scores(own, labels)
        row.update(ari_own=sc["ari"], nmi_own=sc["nmi"], n_own=len(np.unique(own)))
    if method == "original":
        row["n_centroids"] = row["k_true"]
        row["settings"] = (
            f"scale==1.1.2, input binarized as its preprocessing does, batch 64, lr 2e-4, "
            f"{info['n_iter']} iterations (capped; default 30000), latent = posterior mean"
        )
    return row


def save_row(row: dict) -> None:
    """Replace the row of the same (dataset, method, seed) in the CSV, re-read first: another
    runner may have added rows meanwhile. The read and the write hold an exclusive lock
    (``<csv>.lock``), so two runners finishing at once both keep their rows, and the file
    is replaced in one step (written aside, then renamed)."""
    import fcntl

    CSV.parent.mkdir(parents=True, exist_ok=True)
    with open(CSV.with_suffix(".csv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
        if not done.empty:
            same = (done.dataset == row["dataset"]) & (done.method == row["method"])
            done = done[~(same & (done.seed == row["seed"]))]
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        tmp = CSV.with_suffix(".csv.tmp")
        done.to_csv(tmp, index=False)
        os.replace(tmp, CSV)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["forebrain", "cell_lines"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--redo", action="store_true", help="run rows already in the CSV again")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score again the runs whose outputs are in work/shipped; run nothing",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "original" in args.methods and not ensure_original_venv():
        args.methods = [m for m in args.methods if m != "original"]
    if "snapatac2" in args.methods and not ensure_snapatac2_venv():
        args.methods = [m for m in args.methods if m != "snapatac2"]
    log(f"start: {args.datasets} x {args.methods} x seeds {args.seeds}, {THREADS} thread(s)")
    for dataset in args.datasets:
        for seed in args.seeds:
            for method in args.methods:
                done = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
                if not (done.empty or args.redo or args.rescore):
                    have = (done.dataset == dataset) & (done.method == method)
                    if (have & (done.seed == seed)).any():
                        continue
                row = run_one(dataset, method, seed, args.redo, run=not args.rescore)
                if row is None:
                    continue
                save_row(row)
                log(
                    f"done  {dataset} {method} seed {seed}: ARI k-means {row['ari_kmeans']:.3f}, "
                    f"Leiden {row['ari_leiden']:.3f} ({row['n_leiden']} clusters), own "
                    f"{row['ari_own']:.3f} ({row['n_own']}), train {row['train_s']:.0f} s, "
                    f"wall {row['wall_s']:.0f} s"
                )
    log("end")


if __name__ == "__main__":
    sys.exit(main())
