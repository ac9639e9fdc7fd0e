"""Run SnapATAC2's spectral embedding (``snapatac2==2.9.0``) in its own venv.

SnapATAC2 is not a dependency of this package: it lives in ``benchmarks/.venv-snapatac2``
(see :func:`_common.ensure_snapatac2_venv`). This wrapper reads the matrix as every other
method gets it and runs SnapATAC2's own default path on it:
``snap.pp.select_features(adata)`` (its defaults: up to 500,000 features, the 0.5 % least
and most accessible dropped; ``snap.tl.spectral`` refuses to run without that selection
unless ``features=None`` is passed) and ``snap.tl.spectral(adata)`` (its defaults: 30
components, cosine similarity with IDF weights, eigenvectors weighted by the square root of
their eigenvalues), with ``random_state`` set to the seed. It writes ``adata.obsm
["X_spectral"]`` as ``<out>_latent.npy`` and the timings as ``<out>.json``.

Usage (from the repository root)::

    benchmarks/.venv-snapatac2/bin/python benchmarks/snapatac2_spectral.py \
        --data benchmarks/work/forebrain_shipped.npz --out benchmarks/work/snap_fb_0 --seed 0
"""

from __future__ import annotations

import argparse
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from _common import load_matrix, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="prefix of the output files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import anndata as ad
    import snapatac2 as snap

    X, _ = load_matrix(args.data)
    adata = ad.AnnData(X)
    t0, c0 = time.perf_counter(), time.process_time()
    snap.pp.select_features(adata)
    snap.tl.spectral(adata, random_state=args.seed)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    latent = np.asarray(adata.obsm["X_spectral"], dtype=np.float32)
    np.save(args.out + "_latent.npy", latent)
    n_selected = int(np.asarray(adata.var["selected"]).sum())
    write_json(
        Path(args.out + ".json"),
        {
            "train_s": t_fit,
            "train_cpu_s": c_fit,
            "inference_s": 0.0,
            "n_epochs": 0,
            "s_per_epoch": float("nan"),
            "cpu_s_per_epoch": float("nan"),
            "n_features_selected": n_selected,
            "n_components": int(latent.shape[1]),
            "settings": (
                f"snapatac2=={version('snapatac2')}: pp.select_features() and "
                f"tl.spectral() defaults ({n_selected} of {X.shape[1]} features selected, "
                f"{latent.shape[1]} components)"
            ),
        },
    )


if __name__ == "__main__":
    main()
