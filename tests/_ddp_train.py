"""Train SCALE on one or two CPU processes; run by tests/test_ddp.py in a subprocess.

Usage: ``python tests/_ddp_train.py OUT_DIR N_PROCESSES``. Lightning's DDP launcher starts
this script again for every further rank. Each rank writes the prior parameters it holds
just before and just after the GMM initialization and at the end, and a line for each GMM
fit it runs;
rank 0 also writes the trained model's ELBO and the ARI of k-means on its latent.
``train(out, 1)`` gives the single-process run to compare with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import scale_scvi.train._gmm_init as gmm_init
from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac

GMM_INIT_EPOCH = 2


class RecordPrior(Callback):
    """Save the prior on every rank at the last step before and the first step after init,
    and when training has ended."""

    def __init__(self, out: Path):
        self.out = out

    def _save(self, trainer, pl_module, when: str) -> None:
        prior = pl_module.module.prior
        np.savez(
            self.out / f"prior_{when}_rank{trainer.global_rank}.npz",
            **{k: v.detach().cpu().numpy() for k, v in prior.state_dict().items()},
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == GMM_INIT_EPOCH - 1:
            self._save(trainer, pl_module, "before")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == GMM_INIT_EPOCH and batch_idx == 0:
            self._save(trainer, pl_module, "after")

    def on_fit_end(self, trainer, pl_module) -> None:
        # after every callback's on_train_end, so after the mixture's final fit
        self._save(trainer, pl_module, "end")


def counting_fit_gmm(fit, out: Path):
    def wrapped(*args, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(out / f"gmm_fits_rank{rank}.txt", "a") as f:
            f.write("fit\n")
        return fit(*args, **kwargs)

    return wrapped


def train(out: Path, n_processes: int) -> dict | None:
    """Train, write the records under ``out``, and return rank 0's result (None elsewhere)."""
    scvi.settings.seed = 0
    adata = simulate_scatac(
        n_cells=240, n_peaks=150, n_types=3, specific_fraction=0.2, density=(0.1, 0.2), seed=6
    )
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=3, n_hidden=(32,), n_latent=4)
    kwargs = {"accelerator": "cpu", "devices": n_processes}
    if n_processes > 1:
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    model.train(
        max_epochs=10,
        lr=3e-3,
        batch_size=32 // n_processes,  # per process: the same steps per epoch as one process
        gmm_init_epoch=GMM_INIT_EPOCH,
        enable_progress_bar=False,
        callbacks=[RecordPrior(out)],
        **kwargs,
    )
    if model.trainer.global_rank != 0:
        return None
    latent = model.get_latent_representation()
    labels = KMeans(3, n_init=5, random_state=0).fit_predict(latent)
    result = {
        "elbo": float(model.get_elbo()),
        "kmeans_ari": adjusted_rand_score(adata.obs["cell_type"], labels),
        "epochs": len(model.history["train_loss"]),
        "world_size": model.trainer.world_size,
    }
    (out / "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    gmm_init.fit_gmm = counting_fit_gmm(gmm_init.fit_gmm, out)
    train(out, int(sys.argv[2]))
