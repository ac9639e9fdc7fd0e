"""How to read the model's own clusters off a trained model (NOTES: "Clusters read off the
trained latent").

Trains SCALE on the default path (the matrix as shipped, ``setup_anndata(adata)``,
``SCALE(adata)``, ``train(gmm_refit=False)``, one thread) and scores, on the same latent,
the ARI of: the mixture as trained (argmax of ``p(c|z)``); the mixture fitted again on the
final posterior means the way the initialization fits it (Leiden at resolution 1 or 0.5,
BIC merging; what ``gmm_refit=True``, the default, does); that refit followed by 20 EM
iterations on the posterior moments; and Leiden on the latent (scanpy's defaults).

    OMP_NUM_THREADS=1 python benchmarks/cluster_readout.py --datasets cell_lines forebrain \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from _common import DATASETS, train_default_path
from sklearn.metrics import adjusted_rand_score

from scale_scvi.module import GaussianMixturePrior
from scale_scvi.train import fit_gmm


def responsibilities(fitted, mu: np.ndarray) -> np.ndarray:
    """``p(c | z)`` at ``mu`` under a mixture ``(weights, means, variances)``, computed by the
    model's own prior."""
    prior = GaussianMixturePrior(len(fitted[0]), mu.shape[1])
    prior.set_parameters(*(torch.as_tensor(p) for p in fitted))
    with torch.inference_mode():
        return prior.responsibilities(torch.as_tensor(mu, dtype=torch.float32)).numpy()


def em(fitted, mu, var, n_iter=20):
    """EM on the posterior moments (each row a Gaussian ``N(mu, var)``)."""
    weights, means, variances = fitted
    for _ in range(n_iter):
        resp = responsibilities((weights, means, variances), mu)
        mass = resp.sum(0) + 1e-10
        weights, means = mass / mass.sum(), resp.T @ mu / mass[:, None]
        variances = resp.T @ (mu**2 + var) / mass[:, None] - means**2 + 1e-4
    return weights, means, variances


def readouts(model, adata) -> dict[str, tuple[float, int]]:
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    mu, var = model.get_latent_representation(return_dist=True)

    def score(labels):
        return adjusted_rand_score(truth, labels), len(np.unique(labels))

    out = {"as trained": score(np.asarray(model.get_cluster_assignments()))}
    for resolution in (1.0, 0.5):
        fitted = fit_gmm(mu, 30, 0, posterior_var=var, method="leiden", resolution=resolution)
        out[f"refit, res. {resolution:g}"] = score(responsibilities(fitted, mu).argmax(1))
        if resolution == 1.0:
            out["refit + EM"] = score(responsibilities(em(fitted, mu, var), mu).argmax(1))
    view = ad.AnnData(mu)
    sc.pp.neighbors(view, use_rep="X", transformer="sklearn")
    sc.tl.leiden(view, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    out["Leiden on the latent"] = score(view.obs["leiden"].to_numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.datasets:
        for seed in args.seeds:
            adata, model, seconds = train_default_path(DATASETS[name], seed, gmm_refit=False)
            scores = readouts(model, adata).items()
            cells = "  ".join(f"{k}: {a:.3f} ({n})" for k, (a, n) in scores)
            print(f"{name} seed {seed} ({seconds:.0f} s)  {cells}", flush=True)


if __name__ == "__main__":
    main()
