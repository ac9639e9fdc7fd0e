"""Initialization of the Gaussian-mixture prior inside the training loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.mixture import GaussianMixture

logger = logging.getLogger(__name__)


def fit_gmm(
    latent: np.ndarray,
    n_components: int,
    seed: int = 0,
    max_cells: int = 50_000,
    posterior_var: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a diagonal :class:`~sklearn.mixture.GaussianMixture` to posterior means.

    A mixture fitted to the means alone ignores the spread of each ``q(z|x)``; when
    ``posterior_var`` is given, each component's variance is increased by the
    responsibility-weighted mean posterior variance of its cells, so that the mixture
    matches the first two moments of the aggregate posterior ``(1/N) sum_n q(z|x_n)``
    (otherwise the KL term jumps by orders of magnitude at initialization).

    Parameters
    ----------
    latent
        Posterior means, shape ``(n_cells, n_latent)``.
    n_components
        Number of mixture components.
    seed
        Random state of the fit (and of the subsample).
    max_cells
        The fit uses a random subsample of at most this many cells.
    posterior_var
        Posterior variances, shape ``(n_cells, n_latent)``, or ``None``.

    Returns
    -------
    ``(weights, means, variances)`` of shapes ``(K,)``, ``(K, D)``, ``(K, D)``.
    """
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 2:
        raise ValueError(f"latent must be (n_cells, n_latent), got shape {latent.shape}.")
    if not np.isfinite(latent).all():
        raise ValueError(
            "The posterior means contain NaN or infinite values, so the Gaussian mixture "
            "cannot be fitted: training diverged. Lower the learning rate."
        )
    if latent.shape[0] < n_components:
        raise ValueError(
            f"Cannot fit {n_components} mixture components to {latent.shape[0]} training "
            "cells: lower n_centroids, or train on more cells (train_size)."
        )
    rng = np.random.default_rng(seed)
    if latent.shape[0] > max_cells:
        keep = rng.choice(latent.shape[0], max_cells, replace=False)
        latent = latent[keep]
        posterior_var = None if posterior_var is None else posterior_var[keep]
    gmm = GaussianMixture(
        n_components=n_components,
        covariance_type="diag",
        random_state=seed,
        reg_covar=1e-4,
        max_iter=200,
    ).fit(latent)
    variances = gmm.covariances_
    if posterior_var is not None:
        resp = gmm.predict_proba(latent)  # (N, K)
        weight = resp / np.maximum(resp.sum(0, keepdims=True), 1e-12)
        variances = variances + weight.T @ np.asarray(posterior_var, dtype=np.float64)
    return gmm.weights_, gmm.means_, variances


class GMMInitCallback(Callback):
    """Fit the prior's mixture on the posterior means of the training cells.

    At the start of epoch ``init_epoch`` the encoder's posterior means of the training
    cells are computed, a diagonal Gaussian mixture is fitted to them, and its weights,
    means and variances are copied into the module's prior. Under a distributed strategy
    the fit runs once, on rank 0, and the parameters are broadcast to every rank; if the fit
    fails (e.g. the posterior means are not finite), every rank raises the same
    ``ValueError``.

    Parameters
    ----------
    latent_fn
        Returns the posterior means of the cells at the given indices (all cells for
        ``None``); called with the module in evaluation mode.
    n_components
        Number of mixture components.
    init_epoch
        Epoch at whose start the mixture is fitted (0: before any training, as the
        original SCALE does).
    seed
        Random state of the mixture fit.
    """

    def __init__(
        self,
        latent_fn: Callable[[np.ndarray | None], np.ndarray | tuple[np.ndarray, np.ndarray]],
        n_components: int,
        init_epoch: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.latent_fn = latent_fn
        self.n_components = n_components
        self.init_epoch = init_epoch
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.init_epoch:
            return
        module = pl_module.module
        payload = None
        if trainer.is_global_zero:
            indices = getattr(trainer.datamodule, "train_idx", None)
            was_training = module.training
            module.eval()
            try:
                latent = self.latent_fn(indices)
            finally:
                module.train(was_training)
            latent, posterior_var = latent if isinstance(latent, tuple) else (latent, None)
            try:
                fitted = fit_gmm(latent, self.n_components, self.seed, posterior_var=posterior_var)
                payload = [torch.as_tensor(p) for p in fitted]
                logger.info("Initialized the GMM prior on %d posterior means.", latent.shape[0])
            except ValueError as error:
                # Sent to every rank, so that all of them stop instead of waiting for rank 0.
                payload = f"{error} (GMM initialization at epoch {trainer.current_epoch})"
        payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, str):
            raise ValueError(payload)
        module.prior.set_parameters(*payload)
