"""Training objectives compared: ELBO, IWAE and DReG on the labeled scATAC-seq sets.

For each dataset and objective, SCALE is trained on 90% of the cells (a fixed random
split) and evaluated on the held-out 10%: the importance-sampled marginal log-likelihood
(``get_marginal_ll``, K = 100) and the closed-form ELBO (``get_elbo``), both per cell and
averaged. Clustering is scored on all cells with the adjusted Rand index of k-means (true k,
``n_init=20``) on the posterior means and of the argmax of the cluster probabilities.

A second part measures the peak memory of the importance-weighted computation with K = 100
particles on all 140,102 forebrain peaks, with and without gradients, chunked and not.

Usage::

    python benchmarks/objectives.py quality --datasets cell_lines forebrain
    python benchmarks/objectives.py memory
    python benchmarks/objectives.py table      # print the Markdown table from the CSV

Results go to ``benchmarks/results/objectives.csv`` and ``objectives_memory.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUALITY_CSV = RESULTS / "objectives.csv"
MEMORY_CSV = RESULTS / "objectives_memory.csv"
DATASETS = {
    "cell_lines": "schep2017_celllines_600cells.h5ad",
    "forebrain": "preissl2018_forebrain_1043cells.h5ad",
}
OBJECTIVES = ("elbo", "iwae", "dreg")


def machine() -> str:
    """A one-line description of the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU, {threads} thread(s)"


def commit() -> str:
    """The git commit of the code measured (``+dirty`` with uncommitted changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "scale_scvi"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def load(name: str, min_peak_fraction: float):
    """A shared dataset, binarized, with peaks open in fewer than the fraction dropped."""
    import anndata as ad
    import scipy.sparse as sp

    from scale_scvi.data import shared_data_path

    path = shared_data_path(DATASETS[name])
    if path is None:
        raise SystemExit(f"{DATASETS[name]} not found: set SCALE_SCVI_DATA.")
    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.data[:] = (X.data > 0).astype(np.float32)
    X.eliminate_zeros()
    keep = np.asarray((X > 0).mean(0)).ravel() >= min_peak_fraction
    out = ad.AnnData(X[:, keep], obs=adata.obs[["cell_type"]].copy())
    out.var_names = adata.var_names[keep]
    return out


def run_quality(name, objective, n_particles, min_peak_fraction, max_epochs, batch_size, seed):
    """Train on 90% of the cells, evaluate on the other 10%; one result row."""
    import scvi
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from scale_scvi import SCALE

    adata = load(name, min_peak_fraction)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    n_types = len(np.unique(labels))
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    n_held = adata.n_obs // 10
    held_idx, train_idx = np.sort(order[:n_held]), np.sort(order[n_held:])
    train, held = adata[train_idx].copy(), adata[held_idx].copy()

    scvi.settings.seed = seed
    SCALE.setup_anndata(train)
    kwargs = {} if objective == "elbo" else {"n_particles": n_particles}
    model = SCALE(train, n_centroids=n_types, objective=objective, **kwargs)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, batch_size=batch_size, enable_progress_bar=False)
    train_s = time.perf_counter() - start

    scvi.settings.seed = seed
    start = time.perf_counter()
    log_px = model.get_marginal_ll(held, n_mc_samples=100, batch_size=32, return_mean=False)
    ll_s = time.perf_counter() - start
    elbo = np.stack([model.get_elbo(held, return_mean=False) for _ in range(10)]).mean(0)

    SCALE.setup_anndata(adata)
    latent = model.get_latent_representation(adata)
    kmeans = KMeans(n_types, n_init=20, random_state=seed).fit_predict(latent)
    argmax = model.get_cluster_probabilities(adata).argmax(1)
    held_pos = np.isin(np.arange(adata.n_obs), held_idx)
    n_peaks = adata.n_vars
    return {
        "dataset": name,
        "objective": objective,
        "n_particles": 1 if objective == "elbo" else n_particles,
        "n_cells_train": train.n_obs,
        "n_cells_heldout": held.n_obs,
        "n_peaks": n_peaks,
        "min_peak_fraction": min_peak_fraction,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "seed": seed,
        "heldout_log_px_iwae100": float(log_px.mean()),
        "heldout_log_px_se": float(log_px.std(ddof=1) / np.sqrt(log_px.size)),
        "heldout_elbo": float(elbo.mean()),
        "heldout_log_px_per_peak": float(log_px.mean() / n_peaks),
        "ari_kmeans": float(adjusted_rand_score(labels, kmeans)),
        "ari_argmax": float(adjusted_rand_score(labels, argmax)),
        "ari_argmax_heldout": float(adjusted_rand_score(labels[held_pos], argmax[held_pos])),
        "n_clusters_used": int(len(np.unique(argmax))),
        "train_seconds": round(train_s, 1),
        "marginal_ll_seconds": round(ll_s, 1),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": commit(),
    }


def _write_rows(path: Path, rows: list[dict], key: tuple[str, ...]) -> None:
    """Merge rows into a CSV, replacing rows with the same key (runs may be concurrent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = RESULTS.parent / "work" / f"{path.stem}.lock"  # work/ is not tracked
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_rows(path, rows, key)


def _merge_rows(path: Path, rows: list[dict], key: tuple[str, ...]) -> None:
    old = []
    if path.exists():
        with path.open() as f:
            old = list(csv.DictReader(f))
    new_keys = {tuple(str(r[k]) for k in key) for r in rows}
    merged = [r for r in old if tuple(r[k] for k in key) not in new_keys] + rows
    fields = list(rows[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)


# --------------------------------------------------------------------------- memory
MEMORY_CHILD = r"""
import json, sys, time
import torch
from scvi import REGISTRY_KEYS
from scale_scvi.module import SCALEVAE
torch.set_num_threads(1)
n_peaks, n_cells, k, chunk, grad = (int(a) for a in sys.argv[1:6])
torch.manual_seed(0)
module = SCALEVAE(n_input=n_peaks, n_centroids=8, objective="iwae", n_particles=k,
                  particle_chunk_size=chunk)
x = (torch.rand(n_cells, n_peaks) < 0.01).float()
tensors = {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: torch.zeros(n_cells, 1)}
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: count this pass only, not the set-up
base = rss("VmRSS:")
start = time.perf_counter()
if grad:
    _, _, out = module.forward(tensors)
    out.loss.backward()
else:
    module.marginal_ll(tensors, n_mc_samples=k, n_mc_samples_per_pass=chunk)
seconds = time.perf_counter() - start
peak = rss("VmHWM:")
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "seconds": seconds}))
"""


def run_memory(n_peaks: int, n_cells: int, k: int, chunk: int, grad: bool) -> dict:
    """Peak resident memory of one importance-weighted pass, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, *map(str, (n_peaks, n_cells, k, chunk, int(grad)))],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mib = k * n_cells * n_peaks * 4 / 2**20
    return {
        "mode": "training step (gradients)" if grad else "get_marginal_ll (no gradients)",
        "n_peaks": n_peaks,
        "batch_size": n_cells,
        "K": k,
        "chunk": chunk,
        "all_logits_mib": round(logits_mib),
        "peak_rss_mib": round(res["peak_mib"]),
        "rss_before_mib": round(res["base_mib"]),
        "added_mib": round(res["peak_mib"] - res["base_mib"]),
        "seconds": round(res["seconds"], 1),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------- table
def table() -> str:
    """The Markdown tables of the results CSVs."""
    lines = []
    with QUALITY_CSV.open() as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: (r["dataset"], OBJECTIVES.index(r["objective"])))
    lines.append(
        "| dataset (peaks used) | objective | K "
        "| held-out log p(x), IWAE K=100 (± s.e. over cells) "
        "| held-out ELBO "
        "| ARI k-means | ARI argmax | epochs x batch | train s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = float(r["min_peak_fraction"])
        peaks = f"{int(r['n_peaks']):,}" + (f", open in >= {frac:.0%} of cells" if frac else "")
        lines.append(
            f"| {r['dataset']} ({peaks}) | {r['objective']} | {r['n_particles']} "
            f"| {float(r['heldout_log_px_iwae100']):.1f} ± {float(r['heldout_log_px_se']):.1f} "
            f"| {float(r['heldout_elbo']):.1f} | {float(r['ari_kmeans']):.3f} "
            f"| {float(r['ari_argmax']):.3f} | {r['max_epochs']} x {r['batch_size']} "
            f"| {float(r['train_seconds']):.0f} |"
        )
    if MEMORY_CSV.exists():
        with MEMORY_CSV.open() as f:
            mem = list(csv.DictReader(f))
        lines += [
            "",
            "| pass | peaks | cells | K | chunk | logits of all K (MiB) | peak RSS (MiB) "
            "| added by the pass (MiB) | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mem:
            lines.append(
                f"| {r['mode']} | {int(r['n_peaks']):,} | {r['batch_size']} | {r['K']} "
                f"| {r['chunk']} | {r['all_logits_mib']} | {r['peak_rss_mib']} "
                f"| {r['added_mib']} | {r['seconds']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    q.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    q.add_argument("--n-particles", type=int, default=8)
    q.add_argument("--forebrain-min-peak-fraction", type=float, default=0.01)
    q.add_argument("--max-epochs", type=int, default=None, help="default: SCALE.train's")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1)
    m = sub.add_parser("memory")
    m.add_argument("--n-peaks", type=int, default=140_102)
    m.add_argument("--batch-size", type=int, default=16)
    sub.add_parser("table")
    args = parser.parse_args(argv)

    if args.part == "quality":
        import torch

        torch.set_num_threads(args.threads)
        for name in args.datasets:
            frac = args.forebrain_min_peak_fraction if name == "forebrain" else 0.0
            for objective in args.objectives:
                row = run_quality(
                    name,
                    objective,
                    args.n_particles,
                    frac,
                    args.max_epochs,
                    args.batch_size,
                    args.seed,
                )
                print(json.dumps(row), flush=True)
                _write_rows(QUALITY_CSV, [row], ("dataset", "objective", "n_particles", "seed"))
    elif args.part == "memory":
        rows = []
        for grad in (False, True):
            for chunk in (10, 100):
                row = run_memory(args.n_peaks, args.batch_size, 100, chunk, grad)
                print(json.dumps(row), flush=True)
                rows.append(row)
        _write_rows(MEMORY_CSV, rows, ("mode", "n_peaks", "batch_size", "K", "chunk"))
    else:
        print(table())


if __name__ == "__main__":
    main()
