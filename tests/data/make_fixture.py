"""Regenerate the saved SCALE model that ``tests/test_compat.py`` must keep loading.

Run from the repository root::

    python tests/data/make_fixture.py

It writes ``tests/data/scale_model_v0.1.0/`` (``model.pt`` and the ``adata.h5ad`` it was
trained on, through ``SCALE.save(..., save_anndata=True)``), the outputs the loaded model must
reproduce (``scale_model_v0.1.0_expected.npz``) and the versions that made them
(``scale_model_v0.1.0_versions.json``). Regenerate only when the fixture of a *new* version
is added: the point of the existing one is that models saved by version 0.1.0 keep loading.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac

NAME = "scale_model_v0.1.0"
HERE = Path(__file__).resolve().parent


def make_adata():
    """60 cells x 80 peaks, 3 types, 2 batches."""
    adata = simulate_scatac(n_cells=60, n_peaks=80, n_types=3, density=(0.1, 0.2), seed=11)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(60) % 2, "run1", "run2"))
    return adata


def main() -> None:
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    adata = make_adata()
    SCALE.setup_anndata(adata, batch_key="batch")
    model = SCALE(adata, n_centroids=3, n_latent=4, n_hidden=(16,))
    model.train(max_epochs=3, batch_size=20, enable_progress_bar=False)
    model.save(HERE / NAME, overwrite=True, save_anndata=True)
    np.savez(
        HERE / f"{NAME}_expected.npz",
        latent=model.get_latent_representation(),
        cluster_probabilities=model.get_cluster_probabilities(),
        accessibility=model.get_normalized_accessibility(),
    )
    versions = {pkg: version(pkg) for pkg in ("scale-scvi", "scvi-tools", "torch", "anndata")}
    (HERE / f"{NAME}_versions.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
    main()
