"""An interrupted train() keeps what was trained, in eval mode, and says so."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import scvi
from lightning.pytorch.callbacks import Callback

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac

TRAIN = {"batch_size": 32, "enable_progress_bar": False}


class Stop(BaseException):
    """Not an ``Exception``: as a signal turned into an error (the CLI's SIGTERM)."""


class InterruptAt(Callback):
    """Raise ``error`` at the start of the given epoch and step."""

    def __init__(self, epoch: int, batch: int = 0, error: type[BaseException] = KeyboardInterrupt):
        self.epoch, self.batch, self.error = epoch, batch, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.error()


def _model() -> SCALE:
    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=64, n_peaks=60, n_types=2, seed=2)
    SCALE.setup_anndata(adata)
    return SCALE(adata, n_centroids=2, n_hidden=(16,), n_latent=3)


def test_ctrl_c_keeps_the_trained_epochs_in_eval_mode() -> None:
    model = _model()
    handler = signal.getsignal(signal.SIGINT)
    with (
        pytest.warns(
            UserWarning, match=r"during epoch 3 of 5, after 2 complete epochs \(4 steps\)"
        ),
        pytest.raises(KeyboardInterrupt),
    ):
        model.train(max_epochs=5, callbacks=[InterruptAt(epoch=2)], **TRAIN)
    assert model.is_trained
    assert not model.module.training
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again
    assert len(model.history["elbo_train"]) == 2
    assert len(model.train_indices) + len(model.validation_indices) == model.adata.n_obs
    assert np.isfinite(model.get_latent_representation()).all()
    model.train(max_epochs=1, **TRAIN)
    assert model.is_trained


def test_interrupt_before_any_update_leaves_the_model_untrained() -> None:
    model = _model()
    with (
        pytest.warns(UserWarning, match="no update was made"),
        pytest.raises(KeyboardInterrupt),
    ):
        model.train(max_epochs=3, callbacks=[InterruptAt(epoch=0)], **TRAIN)
    assert not model.is_trained
    assert not model.module.training


def test_other_interrupts_come_out_as_they_are() -> None:
    """A BaseException that is not an Exception (a signal raised as one) is not wrapped."""
    model = _model()
    with pytest.warns(UserWarning, match="interrupted \\(Stop\\)"), pytest.raises(Stop):
        model.train(max_epochs=3, callbacks=[InterruptAt(epoch=1, batch=1, error=Stop)], **TRAIN)
    assert model.is_trained
    assert not model.module.training
