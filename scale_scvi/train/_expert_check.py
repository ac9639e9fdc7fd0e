"""The held-out check of a multimodal model's experts, made once during training."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from scale_scvi.module._multivae import EXPERT_MIN_GAIN, EXPERT_Z_THRESHOLD

from ._eval_mode import eval_mode

logger = logging.getLogger(__name__)


class ExpertCheckCallback(Callback):
    """Leave out of the posterior a modality whose encoder does not help explain new cells.

    At the start of epoch ``epoch`` (:meth:`~scale_scvi.model.SCALE.train` gives the end of
    the KL warm-up, before the prior's mixture is fitted) the validation cells that have
    every modality are encoded by each expert alone and by the product of the experts, and
    :meth:`~scale_scvi.module.MultiSCALEVAE.select_experts_on` switches off the expert of a
    modality whose absence explains them better and whose own data the latent does not
    explain better than one latent shared by all of them. Nothing happens without
    validation cells (``train_size=1.0``), with fewer than ``min_cells`` of them paired, or
    when fewer than ``min_steps`` optimizer steps precede the check (an encoder that has
    barely trained tells nothing about its modality; the default schedule makes about
    1,000 before the end of its warm-up).

    Parameters
    ----------
    fit_fn
        Indices of cells -> :meth:`~scale_scvi.module.MultiSCALEVAE.heldout_fit` of those
        cells, ``(M + 2, M, n)``.
    epoch
        Epoch at whose start the check is made.
    min_cells
        Fewest paired validation cells the check is made on.
    min_steps
        Fewest optimizer steps before the check.
    stop_if_changed
        Stop training when the check changes which experts are on (:attr:`stopped`), so that
        :meth:`~scale_scvi.model.SCALE.train` can train again from the start with the
        experts it kept.
    """

    def __init__(
        self,
        fit_fn: Callable[[np.ndarray], np.ndarray],
        epoch: int,
        min_cells: int = 10,
        min_steps: int = 500,
        stop_if_changed: bool = False,
    ):
        super().__init__()
        self.fit_fn = fit_fn
        self.epoch = epoch
        self.min_cells = min_cells
        self.min_steps = min_steps
        self.stop_if_changed = stop_if_changed
        #: What the check measured (``None`` until it is made, or when it was not).
        self.report: dict | None = None
        #: Whether the check changed which experts are on, and stopped training.
        self.stopped = False
        #: Optimizer steps made before the check (``None`` until it is made).
        self.step: int | None = None

    def left_out_message(self, modality: str) -> str:
        """What the check measured against ``modality``'s expert, which it left out, and how
        to keep that expert."""
        report = self.report
        return (
            f"The held-out check left the {modality} expert out of the posterior: on "
            f"{report['n_cells']} validation cells the latent explains their {modality} data "
            f"{report[f'gain_{modality}']:.2f} nats per cell better than one latent shared by "
            f"all of them ({EXPERT_MIN_GAIN:g} nat and {EXPERT_Z_THRESHOLD:g} standard errors "
            "needed to keep it), and the posterior without it explains the cells better (z = "
            f"{report[f'z_{modality}']:.1f}). The {modality} data stay in the objective, "
            "predicted from the latent, but no longer shape it (model.expert_check_ has the "
            "measurements). If they should inform the clusters, train longer (the check comes "
            f"at the end of the KL warm-up, after {self.step} steps here) or pass "
            "select_experts=False."
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        if trainer.global_step < self.min_steps:
            logger.info(
                "Held-out check of the experts skipped: %d optimizer steps before it, fewer "
                "than %d.",
                trainer.global_step,
                self.min_steps,
            )
            return
        module = pl_module.module
        fit = None
        if trainer.is_global_zero:
            indices = getattr(trainer.datamodule, "val_idx", None)
            if indices is not None and len(indices) > 0:
                # A data loader's iterator draws its seed from torch's global generator: the
                # check must not move the random stream that training goes on with, so that a
                # check that keeps every expert leaves training as without it.
                with eval_mode(module), torch.random.fork_rng(devices=[]):
                    fit = np.asarray(self.fit_fn(np.asarray(indices)))
                complete = ~np.isnan(fit.reshape(-1, fit.shape[-1])).any(0)
                fit = fit[..., complete]
                if fit.shape[-1] < self.min_cells:
                    fit = None
        fit = trainer.strategy.broadcast(fit, src=0)
        if fit is None:
            logger.info(
                "Held-out check of the experts skipped: fewer than %d validation cells with "
                "every modality.",
                self.min_cells,
            )
            return
        before = module.expert_active.clone()
        self.report = module.select_experts_on(torch.as_tensor(fit))
        off = [m for m, on in zip(module.modalities, module.expert_active, strict=True) if not on]
        if self.stop_if_changed and not torch.equal(before, module.expert_active):
            trainer.should_stop = True
            self.stopped = True
        logger.info(
            "Held-out check of the experts (log-likelihood per validation cell: %s): %s.",
            ", ".join(f"{k} {v:.2f}" for k, v in self.report.items() if k != "n_cells"),
            f"the {' and '.join(off)} expert left out of the posterior"
            if off
            else "every expert kept",
        )
        self.step = trainer.global_step
