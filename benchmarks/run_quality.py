"""Clustering quality of this SCALE, the original SCALE, PeakVI and LSI on the labeled sets.

Each (dataset, method, seed) runs in its own subprocess on the same binarized matrix,
peaks open in >= 2 % of the cells (``work/<dataset>_min2pct.npz``); this process reads
that child's wall time and peak RSS, scores its latent (k-means with the true k,
``n_init=20``; and the argmax of the cluster probabilities for the two SCALEs) and
appends a row to ``results/quality.csv``.
Rows already in the CSV are kept, so the runner can be resumed.

Usage::

    .venv/bin/python benchmarks/run_quality.py --datasets cell_lines forebrain --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _common import (
    MAIN_PYTHON,
    ORIGINAL_PYTHON,
    RESULTS,
    WORK,
    cluster_scores,
    ensure_original_venv,
    label_scores,
    load_matrix,
    prepare_dataset,
    read_json,
    run_child,
)

METHODS = ["lsi", "scale", "peakvi", "original"]
# Every method gets the same matrix: binarized, peaks open in >= 2 % of the cells (forebrain:
# 17,349 of 140,102 peaks; cell lines: 5,032 of 5,036).
MIN_OPEN_FRACTION = 0.02
CSV = RESULTS / "quality.csv"

# CPU-budget caps of the original SCALE: iterations of its fit loop at its batch size of 64
# (its default is 30,000; measured 0.54 CPU-s per iteration on forebrain's 17,349 peaks and
# 0.22 on the cell lines, i.e. 4.5 h and 1.8 h per run). None: the method's own default.
CAPS = {
    ("original", "cell_lines"): {"max_iter": 3000},
    ("original", "forebrain"): {"max_iter": 3000},
}


def command(method: str, data: str, out: str, seed: int, dataset: str) -> list[str]:
    cap = CAPS.get((method, dataset), {})
    if method == "original":
        cmd = [str(ORIGINAL_PYTHON), "benchmarks/original_scale.py", "--data", data]
        cmd += ["--out", out, "--seed", str(seed)]
        if "max_iter" in cap:
            cmd += ["--max-iter", str(cap["max_iter"])]
        return cmd
    cmd = [MAIN_PYTHON, "benchmarks/methods.py", "--method", method, "--data", data]
    cmd += ["--out", out, "--seed", str(seed)]
    if "max_epochs" in cap:
        cmd += ["--max-epochs", str(cap["max_epochs"])]
    return cmd


def run_one(dataset: str, method: str, seed: int) -> dict | None:
    data = prepare_dataset(dataset, MIN_OPEN_FRACTION)
    if data is None:
        print(f"skip {dataset}: not in the shared data folder", file=sys.stderr)
        return None
    _, labels = load_matrix(data)
    out = str(WORK / f"{method}_{dataset}_{seed}")
    usage = run_child(
        command(method, str(data), out, seed, dataset),
        WORK / "logs" / f"{method}_{dataset}_{seed}.log",
    )
    if usage["returncode"] != 0:
        print(f"{method} on {dataset} (seed {seed}) failed; see work/logs", file=sys.stderr)
        return None
    info = read_json(Path(out + ".json"))
    latent = np.load(out + "_latent.npy")
    km = cluster_scores(latent, labels, seed=0)
    row = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "ari_kmeans": km["ari"],
        "nmi_kmeans": km["nmi"],
        "ari_argmax": np.nan,
        "nmi_argmax": np.nan,
        "wall_s": usage["wall_s"],
        "cpu_s": usage["cpu_s"],
        "train_s": info["train_s"],
        "s_per_epoch": info["s_per_epoch"],
        "cpu_s_per_epoch": info.get("cpu_s_per_epoch", np.nan),
        "n_epochs": info["n_epochs"],
        "peak_rss_mb": usage["peak_rss_mb"],
        "settings": info.get("settings", ""),
    }
    if method in ("scale", "original"):
        gm = label_scores(np.load(out + "_gmm.npy"), labels)
        row["ari_argmax"], row["nmi_argmax"] = gm["ari"], gm["nmi"]
    if method == "original":
        row["settings"] = (
            f"scale==1.1.2, batch 64, lr 2e-4, {info['n_iter']} iterations "
            f"(capped; default 30000), latent = posterior mean"
        )
        sample = cluster_scores(np.load(out + "_latent_sample.npy"), labels, seed=0)
        row["ari_kmeans_own_latent"] = sample["ari"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["cell_lines", "forebrain"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--redo", action="store_true", help="rerun rows already in the CSV")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "original" in args.methods and not ensure_original_venv():
        args.methods = [m for m in args.methods if m != "original"]
    done = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
    for dataset in args.datasets:
        for seed in args.seeds:
            for method in args.methods:
                key = (dataset, method, seed)
                if not done.empty and not args.redo:
                    have = done[
                        (done.dataset == dataset) & (done.method == method) & (done.seed == seed)
                    ]
                    if len(have):
                        continue
                row = run_one(*key)
                if row is None:
                    continue
                print(
                    f"{dataset:10s} {method:8s} seed {seed}: ARI {row['ari_kmeans']:.3f} "
                    f"(argmax {row['ari_argmax']:.3f}) {row['wall_s']:.0f} s "
                    f"{row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                # re-read: another runner may have added rows meanwhile
                done = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
                if not done.empty:
                    same = (done.dataset == dataset) & (done.method == method)
                    done = done[~(same & (done.seed == seed))]
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                done.to_csv(CSV, index=False)


if __name__ == "__main__":
    main()
