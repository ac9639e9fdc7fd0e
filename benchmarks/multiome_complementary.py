"""A simulated RNA + ATAC pair whose modalities carry different halves of the cell types.

Six cell types t = (a, r): the ATAC profile depends only on a (three groups), the RNA
profile only on r (two groups), so neither modality alone can separate the six types and
a joint model has to use both. The check for mixture weights (``"equal"`` or
``"learned"``) and posteriors (``"moe"``, ``"mopoe"``) that must not lose an informative
modality: SCALE on the MuData with ``n_centroids=6`` and the training defaults, against
SCALE on each modality alone; ARI of k-means (k = 6) on the latent of all cells and of
the held-out tenth (for the joint model with the mixture mean and with the experts'
precision-weighted product, ``joint_mean="precision"``). Results: multiome_heldout.md.

    OMP_NUM_THREADS=1 python benchmarks/multiome_complementary.py SEED [RUN ...]
"""

from __future__ import annotations

import sys

import mudata as md
import numpy as np
import scvi
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from scale_scvi import SCALE
from scale_scvi.data import simulate_multiome

N_PER_TYPE = 250


def complementary_pair(seed: int) -> tuple[md.MuData, np.ndarray]:
    """ATAC of a 3-type simulation and RNA of a 2-type one, paired so that type = (a, r)."""
    atac_sim = simulate_multiome(n_cells=2400, n_peaks=3000, n_genes=500, n_types=3, seed=seed)
    rna_sim = simulate_multiome(
        n_cells=2400, n_peaks=300, n_genes=1000, n_types=2, seed=seed + 100
    )
    a_types = atac_sim.obs["cell_type"].cat.codes.to_numpy()
    r_types = rna_sim.obs["cell_type"].cat.codes.to_numpy()
    rng = np.random.default_rng(seed)
    a_rows, r_rows, truth = [], [], []
    for a in range(3):
        a_pool = rng.permutation(np.flatnonzero(a_types == a))
        for r in range(2):
            r_pool = rng.permutation(np.flatnonzero(r_types == r))
            take = slice(r * N_PER_TYPE, (r + 1) * N_PER_TYPE)
            a_rows.append(a_pool[take])
            r_rows.append(r_pool[a * N_PER_TYPE : (a + 1) * N_PER_TYPE])
            truth += [f"a{a}r{r}"] * N_PER_TYPE
    a_rows, r_rows = np.concatenate(a_rows), np.concatenate(r_rows)
    atac = atac_sim.mod["atac"][a_rows].copy()
    rna = rna_sim.mod["rna"][r_rows].copy()
    names = [f"cell_{i}" for i in range(len(truth))]
    atac.obs_names = rna.obs_names = names
    return md.MuData({"atac": atac, "rna": rna}), np.array(truth)


def main() -> None:
    seed = int(sys.argv[1])
    torch.set_num_threads(1)
    md.set_options(pull_on_update=False)
    mdata, truth = complementary_pair(seed)

    def score(latent, cells):
        labels = KMeans(6, n_init=20, random_state=0).fit_predict(latent)
        return adjusted_rand_score(truth[cells], labels)

    runs = {
        "joint equal": ("moe", "equal"),
        "joint learned": ("moe", "learned"),
        "mopoe equal": ("mopoe", "equal"),
        "mopoe learned": ("mopoe", "learned"),
        # the same with the held-out check of the experts (select_experts=True)
        "mopoe learned checked": ("mopoe", "learned"),
        "atac": (None, None),
        "rna": (None, None),
    }
    names = sys.argv[2:] or list(runs)
    for name in names:
        posterior, weights = runs[name]
        scvi.settings.seed = seed
        if weights is None:
            data = mdata.mod[name].copy()
            SCALE.setup_anndata(data)
            model = SCALE(data, n_centroids=6)
        else:
            data = mdata
            SCALE.setup_mudata(data, modalities={"atac_layer": "atac", "rna_layer": "rna"})
            model = SCALE(
                data,
                n_centroids=6,
                posterior=posterior,
                mixture_weights=weights,
                select_experts=name.endswith("checked"),
            )
        model.train(enable_progress_bar=False)
        held = model.validation_indices
        latent = model.get_latent_representation()
        extra = ""
        if weights is not None:  # the experts' normalized product, weighted by certainty
            precision = model.get_latent_representation(joint_mean="precision")
            extra += (
                f" precision_all={score(precision, np.arange(len(truth))):.3f}"
                f" precision_held={score(precision[held], held):.3f}"
            )
        logits = getattr(model.module, "component_logits", None)
        if logits is not None:  # learned weights of the experts (atac, rna)
            logits = logits.detach()
            extra += f" weights={[round(float(w), 3) for w in torch.softmax(logits, 0)]}"
        active = getattr(model.module, "expert_active", None)
        if active is not None and len(active) > 1:  # the experts the held-out check kept
            extra += " experts=" + "+".join(
                m for m, on in zip(model.module.modalities, active, strict=True) if on
            )
        print(
            f"seed {seed} {name}: all={score(latent, np.arange(len(truth))):.3f} "
            f"held={score(latent[held], held):.3f}{extra}",
            flush=True,
        )


if __name__ == "__main__":
    main()
