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

from ._eval_mode import eval_mode

logger = logging.getLogger(__name__)

GMM_INIT_METHODS = ("kmeans", "em", "leiden")

#: Fraction of each cluster's cells whose moments make its component in the mixture fitted
#: when training ends (the clusters read off the trained latent): the central 80 % by
#: Mahalanobis distance, see :func:`fit_gmm`'s ``trim`` and ``benchmarks/NOTES.md``.
REFIT_TRIM = 0.8

#: Resolution of the Leiden partition of that last fit (``method="leiden"``): below scanpy's
#: default, so that its pieces are larger before the merge. The merge joins overlapping
#: pieces but not every piece of one population (a large population is not one Gaussian),
#: and at resolution 1 the clusters were more than the types on most sets measured; 0.5
#: joined some small types as well. The fit at the end of the KL warm-up, which shapes the
#: latent, keeps resolution 1 (``benchmarks/NOTES.md``, "The final fit at Leiden resolution
#: 0.75").
REFIT_RESOLUTION = 0.75


def check_gmm_init_method(method: str, name: str = "method") -> None:
    """Raise a ``ValueError`` unless ``method`` is one of :data:`GMM_INIT_METHODS`."""
    if method not in GMM_INIT_METHODS:
        raise ValueError(f"{name} must be 'kmeans', 'em' or 'leiden', got {method!r}.")


def fit_gmm(
    latent: np.ndarray,
    n_components: int,
    seed: int = 0,
    max_cells: int = 50_000,
    posterior_var: np.ndarray | None = None,
    method: Literal["kmeans", "em", "leiden"] = "kmeans",
    sample_weight: np.ndarray | None = None,
    resolution: float = 1.0,
    trim: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a diagonal Gaussian mixture to posterior means.

    With ``method="kmeans"`` the mixture is read off a k-means partition of the means
    (:class:`~sklearn.cluster.KMeans`, 20 restarts) into ``n_components`` clusters: each
    cluster's fraction of the cells, centroid and per-dimension variance become a
    component's weight, mean and variance. With ``method="leiden"`` it is read the same way
    off a Leiden partition of the means' k-nearest-neighbour graph (scanpy's
    ``neighbors`` with 15 neighbours and ``leiden`` at ``resolution``) whose overlapping
    pieces are merged by the integrated completed likelihood (:func:`merge_partition`), so
    the data choose the number of components: at most ``n_components`` (cells of the
    smallest clusters beyond that go to the nearest kept centroid), possibly fewer. With
    ``method="em"`` it is a diagonal :class:`~sklearn.mixture.GaussianMixture` fitted by EM
    (started from k-means, as sklearn does); it moves the partition away from the cell
    types (see ``benchmarks/NOTES.md``).

    A mixture fitted to the means alone ignores the spread of each ``q(z|x)``; when
    ``posterior_var`` is given, each component's variance is increased by the
    responsibility-weighted mean posterior variance of its cells, so that the mixture
    matches the first two moments of the aggregate posterior ``(1/N) sum_n q(z|x_n)``
    (otherwise the KL term jumps by orders of magnitude at initialization).

    A partition's cluster can hold a few cells far from the others. Their squared distances
    then dominate its variance, and its component becomes so broad that the argmax of
    ``p(c|z)`` gives the cluster's own central cells to a tighter neighbouring component.
    With ``trim=q`` (partition methods only) each component's mean and variance are those
    of the cluster's central fraction ``q`` of rows (by Mahalanobis distance under the
    cluster's plain moments: one trimming step, as in a minimum covariance determinant
    estimate), the variance scaled by ``q / F_{D+2}(F_D^{-1}(q))`` (``F_k``: the chi-square
    distribution function with ``k`` degrees of freedom) so that it is unbiased for a
    Gaussian cluster. The weights stay the clusters' fractions of the cells, and clusters
    of fewer than 5 rows keep their plain moments.

    Parameters
    ----------
    latent
        Posterior means, shape ``(n_rows, n_latent)``.
    n_components
        Number of mixture components (``"leiden"``: the most there can be).
    seed
        Random state of the fit (and of the subsample).
    max_cells
        The fit uses a random subsample of at most this many rows.
    posterior_var
        Posterior variances, shape ``(n_rows, n_latent)``, or ``None``.
    method
        ``"kmeans"``, ``"leiden"`` (a partition read as a mixture) or ``"em"`` (EM).
    sample_weight
        Weight of each row, shape ``(n_rows,)`` (default: all 1). The aggregate posterior
        of a multimodal model has one row per mixture component of each cell; weighting
        them by their weights in the cell's mixture makes each cell count once.
    resolution
        Resolution of the Leiden partition (``method="leiden"``).
    trim
        Fraction of each cluster's rows whose moments make its component (see above), in
        ``(0, 1]``; ``None`` (or 1) for the moments of all its rows. Ignored by ``"em"``.

    Returns
    -------
    ``(weights, means, variances)`` of shapes ``(k,)``, ``(k, D)``, ``(k, D)``, where
    ``k = n_components`` except for ``"leiden"``.
    """
    check_gmm_init_method(method)
    if trim is not None and not 0.0 < trim <= 1.0:
        raise ValueError(f"trim must be in (0, 1] or None, got {trim!r}.")
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 2:
        raise ValueError(f"latent must be (n_cells, n_latent), got shape {latent.shape}.")
    if not np.isfinite(latent).all():
        raise ValueError(
            "The posterior means contain NaN or infinite values, so the Gaussian mixture "
            "cannot be fitted: training diverged. Lower the learning rate."
        )
    if method != "leiden" and latent.shape[0] < n_components:
        raise ValueError(
            f"Cannot fit {n_components} mixture components to {latent.shape[0]} training "
            "cells: lower n_centroids, or train on more cells (train_size)."
        )
    if sample_weight is None:
        sample_weight = np.ones(latent.shape[0])
    sample_weight = np.asarray(sample_weight, dtype=np.float64)
    if sample_weight.shape != (latent.shape[0],) or not (sample_weight > 0).all():
        raise ValueError(
            f"sample_weight must hold one positive weight per row of latent "
            f"({latent.shape[0]}), got shape {sample_weight.shape}."
        )
    rng = np.random.default_rng(seed)
    if latent.shape[0] > max_cells:
        keep = rng.choice(latent.shape[0], max_cells, replace=False)
        latent, sample_weight = latent[keep], sample_weight[keep]
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
        resp = gmm.predict_proba(latent)
    else:
        if method == "kmeans":
            labels = (
                KMeans(n_clusters=n_components, n_init=20, random_state=seed)
                .fit(latent, sample_weight=sample_weight)
                .labels_
            )
        else:
            labels = leiden_partition(latent, n_components, seed=seed, resolution=resolution)
            labels = merge_partition(latent, labels, sample_weight, reg_covar)
        k = n_components if method == "kmeans" else int(labels.max()) + 1
        weights, means, variances = _partition_mixture(latent, labels, k, sample_weight)
        if trim is not None and trim < 1.0:
            means, variances = _trimmed_moments(
                latent, labels, sample_weight, means, variances, trim
            )
        variances = variances + reg_covar
        resp = np.eye(k)[labels]
    if posterior_var is not None:
        resp = resp * sample_weight[:, None]
        weight = resp / np.maximum(resp.sum(0, keepdims=True), 1e-12)
        variances = variances + weight.T @ np.asarray(posterior_var, dtype=np.float64)
    return weights, means, variances


def leiden_partition(
    latent: np.ndarray,
    max_clusters: int,
    seed: int = 0,
    resolution: float = 1.0,
    n_neighbors: int = 15,
) -> np.ndarray:
    """Leiden clusters of the k-nearest-neighbour graph of ``latent``, at most ``max_clusters``.

    The graph is scanpy's default (``pp.neighbors``: 15 neighbours including the cell
    itself, UMAP's fuzzy connectivities; :func:`knn_connectivities`) and the partition
    igraph's Leiden on it, maximizing modularity at ``resolution`` (``tl.leiden`` with
    ``flavor="igraph"``), computed here without scanpy so that no JIT compilation runs
    inside training. Clusters are numbered by decreasing size; if there are more than
    ``max_clusters``, the cells of the smallest go to the nearest centroid of the
    ``max_clusters`` largest.

    Returns
    -------
    Integer labels ``0 .. k-1``, shape ``(n_cells,)``.
    """
    import random

    import igraph as ig

    n_cells = latent.shape[0]
    if n_cells <= n_neighbors:
        return np.zeros(n_cells, dtype=np.int64)
    graph = knn_connectivities(latent, n_neighbors).tocoo()
    upper = graph.row < graph.col
    g = ig.Graph(n=n_cells, edges=np.c_[graph.row[upper], graph.col[upper]].tolist())
    g.es["weight"] = graph.data[upper].tolist()
    previous = random.getstate()
    ig.set_random_number_generator(random.Random(seed))
    try:
        parts = g.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=resolution,
            beta=0.01,
            n_iterations=2,
        )
    finally:
        ig.set_random_number_generator(random)
        random.setstate(previous)
    labels = _by_size(np.asarray(parts.membership))
    if labels.max() >= max_clusters:
        kept = labels < max_clusters
        centroids = np.stack([latent[labels == j].mean(0) for j in range(max_clusters)])
        dist = ((latent[~kept, None, :] - centroids[None]) ** 2).sum(-1)
        labels[~kept] = dist.argmin(1)
    return labels


def knn_connectivities(latent: np.ndarray, n_neighbors: int = 15):
    """UMAP's fuzzy k-nearest-neighbour graph of ``latent`` (what scanpy's ``neighbors``
    computes), as a symmetric :class:`scipy.sparse.csr_matrix`.

    Each cell's ``n_neighbors`` nearest cells (itself included) by Euclidean distance get
    weights ``exp(-(d - rho) / sigma)``, with ``rho`` the distance to its nearest other
    cell and ``sigma`` such that the weights sum to ``log2(n_neighbors)``; the directed
    weights ``W`` are symmetrized as ``W + W^T - W * W^T``.
    """
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    n_cells = latent.shape[0]
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(latent).kneighbors(latent)
    dist, idx = dist[:, 1:], idx[:, 1:]  # the cell itself carries no weight
    rho = dist[:, 0]
    target = np.log2(n_neighbors)
    gap = np.maximum(dist - rho[:, None], 0.0)
    lo, hi = np.zeros(n_cells), np.full(n_cells, np.inf)
    sigma = np.ones(n_cells)
    for _ in range(64):  # bisection on sigma, all cells at once (as UMAP's smooth_knn_dist)
        total = np.exp(-gap / sigma[:, None]).sum(1)
        too_big = total > target
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    mean_dist = dist.mean()
    floor = 1e-3 * np.where(rho > 0, dist.mean(1), mean_dist)
    sigma = np.maximum(sigma, floor)
    weights = np.exp(-gap / sigma[:, None])
    w = sp.csr_matrix(
        (weights.ravel(), (np.repeat(np.arange(n_cells), idx.shape[1]), idx.ravel())),
        shape=(n_cells, n_cells),
    )
    return (w + w.T - w.multiply(w.T)).tocsr()


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel ``labels`` as ``0 .. k-1`` by decreasing cluster size."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return np.argsort(order)[inverse]


def merge_partition(
    latent: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    reg_covar: float = 1e-4,
    criterion: Literal["icl", "bic"] = "icl",
) -> np.ndarray:
    """Merge the clusters of a partition that one diagonal Gaussian describes as well as two.

    Each cluster is read as a diagonal Gaussian (its centroid and per-dimension variance).
    For each pair of clusters, the cells of both are scored under the two-component mixture
    of their Gaussians (weighted by their sizes) and under the one Gaussian of their union,
    by the integrated completed likelihood (ICL; Biernacki, Celeux and Govaert, 2000): the
    two-component mixture must gain more than the Bayesian information criterion's price of
    its extra ``2 D + 1`` parameters, ``(2 D + 1) / 2 * log(n_i + n_j)`` nats, plus the
    entropy of the cells' assignments between the two, ``-sum_n sum_k t_nk log t_nk`` (``t``:
    the two components' responsibilities). Pairs are merged greedily, the best first, until
    no pair qualifies. Pieces of one population (what a graph partition at a fixed
    resolution makes of a large population) overlap, and their assignments' entropy grows
    with the number of cells as fast as the likelihood gain of two Gaussians over one for a
    population that is not exactly Gaussian: they are merged at thousands of cells too,
    where the BIC price alone, which grows as ``log n``, stopped merging them (see
    ``benchmarks/NOTES.md``, "Merging the Leiden pieces by the integrated completed
    likelihood"). Well-separated populations, small ones included, have assignments of
    almost no entropy and are not merged.

    Parameters
    ----------
    latent
        Points, shape ``(n, D)``.
    labels
        Cluster of each point, integers.
    sample_weight
        Weight of each point (default: all 1).
    reg_covar
        Added to every variance.
    criterion
        ``"icl"`` (above) or ``"bic"``: the price of the extra parameters alone, the
        criterion before the ICL (kept for ``benchmarks/merge_criterion.py``).

    Returns
    -------
    Labels ``0 .. k-1`` of the merged partition, by decreasing size.
    """
    if criterion not in ("icl", "bic"):
        raise ValueError(f"criterion must be 'icl' or 'bic', got {criterion!r}.")
    labels = _by_size(np.asarray(labels))
    weight = np.ones(latent.shape[0]) if sample_weight is None else np.asarray(sample_weight)
    kept = set(range(int(labels.max()) + 1))
    cache: dict[tuple[int, int], float] = {}
    while len(kept) > 1:
        best, best_gain = None, 0.0
        for i in kept:
            for j in kept:
                if j <= i:
                    continue
                if (i, j) not in cache:
                    cache[i, j] = merge_value(
                        latent, weight, labels == i, labels == j, reg_covar, criterion
                    )
                if cache[i, j] > best_gain:
                    best, best_gain = (i, j), cache[i, j]
        if best is None:
            break
        i, j = best
        labels = np.where(labels == j, i, labels)
        kept.discard(j)
        cache = {pair: v for pair, v in cache.items() if i not in pair and j not in pair}
    return _by_size(labels)


def merge_value(
    latent: np.ndarray,
    weight: np.ndarray,
    in_i: np.ndarray,
    in_j: np.ndarray,
    reg_covar: float = 1e-4,
    criterion: Literal["icl", "bic"] = "icl",
) -> float:
    """:func:`merge_partition`'s criterion for one pair of clusters (the rows ``in_i`` and
    ``in_j``, boolean masks): the log-likelihood of their union's one Gaussian minus that of
    the two-component mixture of their Gaussians, plus (``"icl"``) the entropy of the
    assignments between the two, plus the price ``(2 D + 1) / 2 * log(n_i + n_j)`` of the
    extra component's parameters, in nats. Positive: merge."""

    def moments(mask: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        w = weight[mask]
        mass = w.sum()
        mean = w @ latent[mask] / mass
        var = w @ (latent[mask] - mean) ** 2 / mass + reg_covar
        return mass, mean, var

    def log_normal(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return -0.5 * (np.log(2 * np.pi * var).sum() + ((x - mean) ** 2 / var).sum(-1))

    mask = in_i | in_j
    x, w = latent[mask], weight[mask]
    (mi, mu_i, var_i), (mj, mu_j, var_j) = moments(in_i), moments(in_j)
    log_i = np.log(mi / (mi + mj)) + log_normal(x, mu_i, var_i)
    log_j = np.log(mj / (mi + mj)) + log_normal(x, mu_j, var_j)
    two = np.logaddexp(log_i, log_j)
    _, mu, var = moments(mask)
    gain = log_normal(x, mu, var) - two  # of one Gaussian over the two
    if criterion == "icl":
        # plus the entropy of each cell's assignment between the two
        t_i, t_j = np.exp(log_i - two), np.exp(log_j - two)
        gain = gain - (t_i * (log_i - two) + t_j * (log_j - two))
    return float(w @ gain) + 0.5 * (2 * latent.shape[1] + 1) * np.log(mi + mj)


def _trimmed_moments(
    latent: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    trim: float,
    min_rows: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean and per-dimension variance over its central ``trim`` fraction of
    weight (rows by increasing Mahalanobis distance under ``means`` / ``variances``), the
    variance made unbiased for a Gaussian cluster (see :func:`fit_gmm`)."""
    from scipy.stats import chi2

    n_dim = latent.shape[1]
    consistency = trim / chi2.cdf(chi2.ppf(trim, n_dim), n_dim + 2)
    means, variances = means.copy(), variances.copy()
    for j in range(means.shape[0]):
        rows = np.flatnonzero(labels == j)
        if rows.size < min_rows:
            continue
        x, w = latent[rows], sample_weight[rows]
        d2 = ((x - means[j]) ** 2 / np.maximum(variances[j], 1e-12)).sum(1)
        order = np.argsort(d2, kind="stable")
        before = np.cumsum(w[order]) - w[order]  # weight of the rows closer than each
        kept = order[before < trim * w.sum()]
        xk, wk = x[kept], w[kept] / w[kept].sum()
        means[j] = wk @ xk
        variances[j] = consistency * (wk @ (xk - means[j]) ** 2)
    return means, variances


def _partition_mixture(
    latent: np.ndarray, labels: np.ndarray, n_components: int, sample_weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and variances of the clusters of a partition of ``latent``.

    A cluster left empty (fewer distinct points than clusters) gets the weight of one cell
    and the mean and variance of all cells, so that every component stays a valid Gaussian.
    """
    onehot = np.eye(n_components)[labels] * sample_weight[:, None]
    mass = onehot.sum(0)
    total = sample_weight.sum()
    overall_mean = (sample_weight @ latent) / total
    overall_var = (sample_weight @ (latent - overall_mean) ** 2) / total
    safe = np.maximum(mass, 1e-12)[:, None]
    means = onehot.T @ latent / safe
    variances = onehot.T @ latent**2 / safe - means**2
    counts = np.bincount(labels, minlength=n_components)
    single = counts <= 1
    variances[single] = overall_var
    empty = counts == 0
    means[empty] = overall_mean
    mass[empty] = sample_weight.min()
    return mass / mass.sum(), means, np.maximum(variances, 0.0)


class GMMInitCallback(Callback):
    """Fit the prior's mixture on the posterior means of the training cells, and prune it.

    At the start of epoch ``init_epoch`` the encoder's posterior means of the training
    cells are computed, a diagonal Gaussian mixture is fitted to them (:func:`fit_gmm`),
    and its weights, means and variances are copied into the module's prior; with
    ``method="leiden"`` the number of components is the number of Leiden clusters (at most
    the prior's), the others are switched off. From then on, at the end of every epoch,
    components whose weight is below half a cell's (``0.5 / n_train``) are switched off.
    When training ends, the mixture is fitted once more, the same way, on the posterior
    means of the trained encoder (``refit``): the clusters are then read off the final
    latent space, where the mixture learned by gradient alongside the encoder drifts away
    from the cell types (``benchmarks/NOTES.md``, "Clusters read off the trained latent").
    That fit takes each component's moments from the central :data:`REFIT_TRIM` of its
    cluster (``refit_trim``; :func:`fit_gmm`'s ``trim``), so that a few outlying cells do not
    widen a component until its neighbours take its cells, and with ``method="leiden"`` it
    reads Leiden at :data:`REFIT_RESOLUTION` (``refit_resolution``), which leaves the merge
    larger pieces to join.
    Last, every component that is the most probable one of no training cell is switched
    off, so that the components left are the clusters (see
    :meth:`~scale_scvi.module.GaussianMixturePrior.prune`). Under a distributed strategy
    the fit runs once, on rank 0, and the parameters are broadcast to every rank; if the fit
    fails (e.g. the posterior means are not finite), every rank raises the same
    ``ValueError``.

    Parameters
    ----------
    latent_fn
        Returns the posterior means and variances of the cells at the given indices (all
        cells for ``None``), optionally with a third array of row weights (see
        :func:`fit_gmm`'s ``sample_weight``); called with the module in evaluation mode.
    n_components
        Number of mixture components (``"leiden"``: the most there can be).
    init_epoch
        Epoch at whose start the mixture is fitted (0: before any training, as the
        original SCALE does).
    seed
        Random state of the mixture fit.
    method
        How the mixture is fitted (see :func:`fit_gmm`): ``"kmeans"``, ``"leiden"`` or
        ``"em"``.
    resolution
        Resolution of the Leiden partition (the fit at ``init_epoch``).
    prune
        Switch off the components the data do not support (as above).
    refit
        Fit the mixture once more, the same way, on the posterior means of the trained
        encoder when training ends (as above).
    refit_trim
        ``trim`` of that last fit (``None``: the moments of all the cluster's cells).
    refit_resolution
        Resolution of that last fit's Leiden partition (``method="leiden"``).
    """

    def __init__(
        self,
        latent_fn: Callable[[np.ndarray | None], np.ndarray | tuple[np.ndarray, ...]],
        n_components: int,
        init_epoch: int = 0,
        seed: int = 0,
        method: Literal["kmeans", "em", "leiden"] = "kmeans",
        resolution: float = 1.0,
        prune: bool = True,
        refit: bool = True,
        refit_trim: float | None = REFIT_TRIM,
        refit_resolution: float = REFIT_RESOLUTION,
    ):
        super().__init__()
        check_gmm_init_method(method)
        self.latent_fn = latent_fn
        self.n_components = n_components
        self.init_epoch = init_epoch
        self.seed = seed
        self.method = method
        self.resolution = resolution
        self.prune = prune
        self.refit = refit
        self.refit_trim = refit_trim
        self.refit_resolution = refit_resolution
        self.n_train = None

    def _rows(self, trainer, module) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Posterior means, variances and row weights of the training cells."""
        indices = getattr(trainer.datamodule, "train_idx", None)
        with eval_mode(module):
            rows = self.latent_fn(indices)
        rows = rows if isinstance(rows, tuple) else (rows,)
        return tuple(rows) + (None,) * (3 - len(rows))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # not when an earlier callback has just stopped training (the held-out check of the
        # experts, before a new start)
        if trainer.current_epoch == self.init_epoch and not trainer.should_stop:
            self._fit(trainer, pl_module.module, f"start of epoch {trainer.current_epoch}")

    def _fit(
        self,
        trainer,
        module,
        when: str,
        trim: float | None = None,
        resolution: float | None = None,
    ) -> np.ndarray | None:
        """Fit the mixture on rank 0 and copy it into every rank's prior; return the
        posterior means it was fitted on (on rank 0; ``None`` on the others). ``resolution``
        ``None``: the callback's ``resolution``."""
        payload = latent = None
        if trainer.is_global_zero:
            latent, posterior_var, sample_weight = self._rows(trainer, module)
            self.n_train = (
                latent.shape[0] if sample_weight is None else float(np.sum(sample_weight))
            )
            try:
                fitted = fit_gmm(
                    latent,
                    self.n_components,
                    self.seed,
                    posterior_var=posterior_var,
                    method=self.method,
                    sample_weight=sample_weight,
                    resolution=self.resolution if resolution is None else resolution,
                    trim=trim,
                )
                # The number of cells goes with the parameters: every rank needs it to take
                # part in the pruning broadcasts of on_train_epoch_end.
                payload = ([torch.as_tensor(p) for p in fitted], self.n_train)
                logger.info(
                    "Fitted the GMM prior (%d components) on %d posterior means (%s).",
                    len(fitted[0]),
                    latent.shape[0],
                    when,
                )
            except ValueError as error:
                # Sent to every rank, so that all of them stop instead of waiting for rank 0.
                payload = f"{error} (GMM fit at the {when})"
        payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, str):
            raise ValueError(payload)
        parameters, self.n_train = payload
        module.prior.set_parameters(*parameters)
        return latent

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.prune or trainer.current_epoch < self.init_epoch or self.n_train is None:
            return
        prior = pl_module.module.prior
        keep = prior.weights >= 0.5 / self.n_train
        keep = trainer.strategy.broadcast(keep, src=0)
        prior.prune(keep)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch <= self.init_epoch or self.n_train is None:
            return
        module = pl_module.module
        # The posterior means of the final fit are the ones the pruning reads: one pass.
        latent = (
            self._fit(
                trainer,
                module,
                "end of training",
                trim=self.refit_trim,
                resolution=self.refit_resolution,
            )
            if self.refit
            else None
        )
        if not self.prune:
            return
        keep = None
        if trainer.is_global_zero:
            if latent is None:
                latent, _, _ = self._rows(trainer, module)
            with torch.inference_mode():
                z = torch.as_tensor(latent, device=module.prior.means.device)
                best = module.prior.responsibilities(z.to(module.prior.means.dtype)).argmax(-1)
            keep = torch.zeros_like(module.prior.active)
            keep[best.unique()] = True
        keep = trainer.strategy.broadcast(keep, src=0)
        n_off = module.prior.prune(keep)
        logger.info(
            "%d mixture components on after training (%d pruned).", module.prior.n_active, n_off
        )
