"""The joint latent of cells the model was not trained on (sci-CAR kidney, RNA + ATAC).

SCALE on the MuData with the multiome tutorial's settings (``n_centroids=14``,
``n_hidden=(256, 128)``, ``train(train_size=0.9)``, one thread), with equal or learned
mixture weights; ARI of k-means (true k = 14) on the joint latent (``joint_mean`` =
``"mixture"`` or ``"precision"``) of all cells and of the held-out cells alone, and on the
RNA expert of the held-out cells. ``rna`` in place of the weights: SCALE on the RNA alone,
same settings, same held-out cells; ``mopoe-equal`` / ``mopoe-learned``: the
``posterior="mopoe"`` model (the experts and their product). Results: multiome_heldout.md.

    OMP_NUM_THREADS=1 python benchmarks/multiome_heldout.py 0 equal
    OMP_NUM_THREADS=1 python benchmarks/multiome_heldout.py 0 learned
    OMP_NUM_THREADS=1 python benchmarks/multiome_heldout.py 0 rna
    OMP_NUM_THREADS=1 python benchmarks/multiome_heldout.py 0 mopoe-learned
"""

from __future__ import annotations

import sys

import mudata as md
import numpy as np
import scvi
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import scale_scvi
from scale_scvi import SCALE


def main() -> None:
    seed, weights = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    md.set_options(pull_on_update=False)
    atac, rna = scale_scvi.datasets.scicar_kidney()
    mdata = md.MuData({"atac": atac, "rna": rna})
    truth = rna.obs["cell_type"].to_numpy()
    scvi.settings.seed = seed

    def score(latent, cells):
        labels = KMeans(14, n_init=20, random_state=0).fit_predict(latent)
        return adjusted_rand_score(truth[cells], labels)

    out = {}
    if weights == "rna":
        SCALE.setup_anndata(rna)
        model = SCALE(rna, n_centroids=14, n_hidden=(256, 128))
        model.train(train_size=0.9, enable_progress_bar=False)
        held = model.validation_indices
        out["all"] = score(model.get_latent_representation(), np.arange(len(truth)))
        out["held"] = score(model.get_latent_representation(indices=held), held)
        print(f"seed {seed} rna-only", " ".join(f"{k}={v:.3f}" for k, v in out.items()))
        return
    SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac", "rna_layer": "rna"})
    # "mopoe-learned": the mixture of the experts and their product, learned weights
    posterior, weights = (
        ("mopoe", weights[6:]) if weights.startswith("mopoe-") else ("moe", weights)
    )
    model = SCALE(
        mdata, n_centroids=14, n_hidden=(256, 128), posterior=posterior, mixture_weights=weights
    )
    model.train(train_size=0.9, enable_progress_bar=False)
    held = model.validation_indices

    for joint_mean in ("mixture", "precision"):
        latent = model.get_latent_representation(joint_mean=joint_mean)
        out[f"all_{joint_mean}"] = score(latent, np.arange(len(truth)))
        latent = model.get_latent_representation(indices=held, joint_mean=joint_mean)
        out[f"held_{joint_mean}"] = score(latent, held)
    out["held_rna_expert"] = score(
        model.get_latent_representation(indices=held, modality="rna"), held
    )
    active = model.module.expert_active  # the experts the held-out check kept
    experts = "+".join(m for m, on in zip(model.module.modalities, active, strict=True) if on)
    print(
        f"seed {seed} {sys.argv[2]}",
        " ".join(f"{k}={v:.3f}" for k, v in out.items()),
        f"experts={experts}",
        flush=True,
    )


if __name__ == "__main__":
    main()
