"""The training plan logs the epoch metrics once per epoch, with scvi-tools' values."""

from __future__ import annotations

import numpy as np
import pytest
import scvi
from lightning.pytorch import LightningModule
from scvi.train import TrainingPlan

from scale_scvi import SCALE
from scale_scvi.train import EpochMetricsTrainingPlan


def _train(adata, plan_cls, monkeypatch) -> tuple[dict, list[str], np.ndarray]:
    """Train with ``plan_cls``; the history, the names of Lightning's ``log`` calls, the
    latent."""
    calls = []
    log = LightningModule.log

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return log(self, name, *args, **kwargs)

    scvi.settings.seed = 0
    adata = adata.copy()
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=4)
    monkeypatch.setattr(SCALE, "_training_plan_cls", plan_cls)
    with monkeypatch.context() as patch:
        patch.setattr(LightningModule, "log", counted)
        model.train(max_epochs=4, batch_size=32, enable_progress_bar=False)
    return model.history, calls, model.get_latent_representation()


@pytest.mark.filterwarnings("ignore:.*have no accessible cell")
def test_epoch_metrics_are_logged_once_per_epoch_with_scvis_values(
    small_adata, monkeypatch
) -> None:
    """Against scvi-tools' own plan on the same run: the same history (names, one row per
    epoch, the same values), the same trained weights, and Lightning's ``log`` called
    about once per epoch and metric instead of at every minibatch."""
    ours, calls, latent = _train(small_adata, EpochMetricsTrainingPlan, monkeypatch)
    theirs, calls_scvi, latent_scvi = _train(small_adata, TrainingPlan, monkeypatch)
    assert sorted(ours) == sorted(theirs)
    assert "elbo_validation" in ours and "train_loss" in ours
    for key, frame in theirs.items():
        assert len(ours[key]) == len(frame) > 0, key
        np.testing.assert_allclose(
            ours[key].to_numpy(float), frame.to_numpy(float), rtol=1e-6, err_msg=key
        )
    np.testing.assert_array_equal(latent, latent_scvi)
    # 180 training cells in minibatches of 32: 6 steps and 1 validation step per epoch;
    # scvi-tools logs 6 names per training step (kl_weight, train_loss, 4 ELBO terms) and
    # 5 per validation step, this plan the epoch metrics once per epoch and kl_weight at
    # the steps whose values Lightning writes (here each epoch's last: SCALE.train logs
    # every min(10, steps per epoch) steps), for the same history rows.
    epochs = 4
    assert len(calls_scvi) == epochs * (6 * 6 + 5)
    assert calls.count("kl_weight") == epochs
    assert len(calls) == epochs * (1 + 5 + 5)


@pytest.mark.filterwarnings("ignore:.*have no accessible cell")
def test_early_stopping_and_lr_schedule_read_the_deferred_metrics(
    small_adata, monkeypatch
) -> None:
    """Early stopping and ReduceLROnPlateau monitor ``elbo_validation``, which this plan logs
    at the epoch's last validation minibatch: they stop and lower the learning rate at the
    same epochs as with scvi-tools' plan."""

    def run(plan_cls):
        scvi.settings.seed = 0
        adata = small_adata.copy()
        SCALE.setup_anndata(adata)
        model = SCALE(adata, n_centroids=4)
        monkeypatch.setattr(SCALE, "_training_plan_cls", plan_cls)
        model.train(
            max_epochs=200,
            early_stopping=True,
            early_stopping_patience=5,
            plan_kwargs={"reduce_lr_on_plateau": True, "lr_patience": 3},
            enable_progress_bar=False,
        )
        return len(model.history["elbo_train"]), model.history["lr-FusedAdamW"].to_numpy(float)

    epochs, lr = run(EpochMetricsTrainingPlan)
    epochs_scvi, lr_scvi = run(TrainingPlan)
    assert epochs == epochs_scvi < 200
    assert lr.min() < lr[0]
    np.testing.assert_allclose(lr, lr_scvi)
