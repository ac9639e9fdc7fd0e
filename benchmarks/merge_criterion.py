"""The merge of the Leiden pieces: the integrated completed likelihood against the BIC.

Without ``n_centroids`` the mixture is read off a Leiden partition of the posterior means,
whose pieces ``merge_partition`` merges (``scale_scvi/train/_gmm_init.py``). This script
compares its two criteria, ``criterion="icl"`` (the default) and ``"bic"`` (the one before):

- on synthetic points in 10 dimensions: the halves of a uniform box, and two Gaussian
  populations ``d`` standard deviations apart along one axis, at several sizes (the number
  of clusters left);
- on the latents that the other benchmarks stored (``work/``: the quality table's default
  rows, ``run_quality.py``, and the pooled sets, ``pooled_cells.py``), the readout alone,
  as the fit at the end of training makes it but on all cells: Leiden (random seed 0), the
  merge, each cluster's trimmed moments (``REFIT_TRIM``), the argmax of the mixture; scored
  against the labels. Latents not there are skipped.

Rows go to ``results/merge_criterion.csv``::

    .venv/bin/python benchmarks/merge_criterion.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from _common import RESULTS, WORK, label_scores, load_matrix

from scale_scvi.train import _gmm_init as gmm

CSV = RESULTS / "merge_criterion.csv"
CRITERIA = ("icl", "bic")


def synthetic_rows(seed: int = 0) -> list[dict]:
    """Clusters left by each criterion on the box's halves and on two Gaussians."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (200, 1_000, 5_000, 20_000):
        box = rng.uniform(-1, 1, size=(n, 10))
        halves = (box[:, 0] > 0).astype(int)
        for criterion in CRITERIA:
            left = len(np.unique(gmm.merge_partition(box, halves, criterion=criterion)))
            rows.append({"set": "uniform box, halves", "cells": n, "criterion": criterion,
                         "n_clusters": left})  # fmt: skip
    for n in (100, 1_000, 5_000):
        for d in (2.5, 3.0, 3.5, 4.0, 5.0):
            x = rng.normal(size=(2 * n, 10))
            x[n:, 0] += d
            labels = np.repeat([0, 1], n)
            for criterion in CRITERIA:
                left = len(np.unique(gmm.merge_partition(x, labels, criterion=criterion)))
                rows.append({"set": f"two Gaussians {d} sd apart", "cells": 2 * n,
                             "criterion": criterion, "n_clusters": left})  # fmt: skip
    return rows


def readout(latent: np.ndarray, criterion: str, seed: int = 0) -> np.ndarray:
    """The fit at the end of training, on all cells, with the given merge; its argmax."""
    labels = gmm.leiden_partition(latent, 30, seed=seed)
    labels = gmm.merge_partition(latent, labels, criterion=criterion)
    k = int(labels.max()) + 1
    weight = np.ones(latent.shape[0])
    weights, means, variances = gmm._partition_mixture(latent, labels, k, weight)
    means, variances = gmm._trimmed_moments(
        latent, labels, weight, means, variances, gmm.REFIT_TRIM
    )
    variances = variances + 1e-4
    log_p = np.log(weights) - 0.5 * (
        np.log(2 * np.pi * variances).sum(1)
        + ((latent[:, None, :] - means) ** 2 / variances).sum(-1)
    )
    return log_p.argmax(1)


def stored_latents() -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(set, training seed, latent, labels) of the stored default-path latents."""
    found = []
    for dataset in ("cell_lines", "forebrain"):
        for seed in range(3):
            path = WORK / "shipped" / f"scale_{dataset}_{seed}_latent.npy"
            if path.exists():
                _, labels = load_matrix(WORK / f"{dataset}_shipped.npz")
                found.append((f"{dataset}, as shipped", seed, np.load(path), labels))
    for stem in sorted(p.stem for p in WORK.glob("pooled_*_d0.npz")):
        _, labels = load_matrix(WORK / f"{stem}.npz")
        for seed in range(4):
            path = WORK / f"{stem}_scale_{seed}_latent.npy"
            if path.exists():
                found.append((stem.removeprefix("pooled_"), seed, np.load(path), labels))
    return found


def main() -> None:
    rows = synthetic_rows()
    for name, seed, latent, labels in stored_latents():
        latent = np.asarray(latent, dtype=np.float64)
        for criterion in CRITERIA:
            pred = readout(latent, criterion)
            rows.append({"set": name, "cells": latent.shape[0], "seed": seed,
                         "criterion": criterion, "n_clusters": len(np.unique(pred)),
                         "ari": round(label_scores(pred, labels)["ari"], 4)})  # fmt: skip
            print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(CSV, index=False)
    print(f"wrote {CSV}")


if __name__ == "__main__":
    main()
