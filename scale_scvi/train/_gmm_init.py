"""Initialization of the Gaussian-mixture prior inside the training loop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

logger = logging.getLogger(__name__)

GMM_INIT_METHODS = ("kmeans", "em")


def check_gmm_init_method(method: str, name: str = "method") -> None:
    """Raise a ``ValueError`` unless ``method`` is one of :data:`GMM_INIT_METHODS`."""
    if method not in GMM_INIT_METHODS:
        raise ValueError(f"{name} must be 'kmeans' or 'em', got {method!r}.")


def fit_gmm(
    latent: np.ndarray,
    n_components: int,
    seed: int = 0,
    max_cells: int = 50_000,
    posterior_var: np.ndarray | None = None,
    method: Literal["kmeans", "em"] = "kmeans",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a diagonal Gaussian mixture to posterior means.

    With ``method="kmeans"`` the mixture is read off a k-means partition of the means
    (:class:`~sklearn.cluster.KMeans`, 20 restarts): each cluster's fraction of the cells,
    centroid and per-dimension variance become a component's weight, mean and variance.
    With ``method="em"`` it is a diagonal :class:`~sklearn.mixture.GaussianMixture` fitted
    by EM (started from k-means, as sklearn does). On the forebrain set EM moves the
    partition away from the cell types (ARI of the mixture's assignments 0.43 against 0.56
    for the k-means partition it starts from, at the end of the KL warm-up), so k-means is
    the default.

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
    method
        ``"kmeans"`` (a k-means partition read as a mixture) or ``"em"`` (EM).

    Returns
    -------
    ``(weights, means, variances)`` of shapes ``(K,)``, ``(K, D)``, ``(K, D)``.
    """
    check_gmm_init_method(method)
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
    reg_covar = 1e-4
    if method == "em":
        gmm = GaussianMixture(
            n_components=n_components,
            covariance_type="diag",
            random_state=seed,
            reg_covar=reg_covar,
            max_iter=200,
        ).fit(latent)
        weights, means, variances = gmm.weights_, gmm.means_, gmm.covariances_
        resp = gmm.predict_proba(latent) if posterior_var is not None else None
    else:
        weights, means, variances, labels = _kmeans_mixture(latent, n_components, seed)
        variances = variances + reg_covar
        resp = np.eye(n_components)[labels] if posterior_var is not None else None
    if resp is not None:
        weight = resp / np.maximum(resp.sum(0, keepdims=True), 1e-12)
        variances = variances + weight.T @ np.asarray(posterior_var, dtype=np.float64)
    return weights, means, variances


def _kmeans_mixture(
    latent: np.ndarray, n_components: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means, variances and labels of a k-means partition of ``latent``.

    A cluster left empty (fewer distinct points than clusters) gets the weight of one cell
    and the variance of all cells, so that every component stays a valid Gaussian.
    """
    kmeans = KMeans(n_clusters=n_components, n_init=20, random_state=seed).fit(latent)
    labels = kmeans.labels_
    counts = np.bincount(labels, minlength=n_components)
    weights = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
    overall = latent.var(0)
    variances = np.stack(
        [latent[labels == j].var(0) if counts[j] > 1 else overall for j in range(n_components)]
    )
    return weights, kmeans.cluster_centers_.astype(np.float64), variances, labels


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
    method
        How the mixture is fitted (see :func:`fit_gmm`): ``"kmeans"`` or ``"em"``.
    """

    def __init__(
        self,
        latent_fn: Callable[[np.ndarray | None], np.ndarray | tuple[np.ndarray, np.ndarray]],
        n_components: int,
        init_epoch: int = 0,
        seed: int = 0,
        method: Literal["kmeans", "em"] = "kmeans",
    ):
        super().__init__()
        check_gmm_init_method(method)
        self.latent_fn = latent_fn
        self.n_components = n_components
        self.init_epoch = init_epoch
        self.seed = seed
        self.method = method

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
                fitted = fit_gmm(
                    latent,
                    self.n_components,
                    self.seed,
                    posterior_var=posterior_var,
                    method=self.method,
                )
                payload = [torch.as_tensor(p) for p in fitted]
                logger.info("Initialized the GMM prior on %d posterior means.", latent.shape[0])
            except ValueError as error:
                # Sent to every rank, so that all of them stop instead of waiting for rank 0.
                payload = f"{error} (GMM initialization at epoch {trainer.current_epoch})"
        payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, str):
            raise ValueError(payload)
        module.prior.set_parameters(*payload)
