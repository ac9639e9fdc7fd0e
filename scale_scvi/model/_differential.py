"""Differential accessibility: between groups of cells (scvi-tools' DE framework, as PEAKVI)
and between mixture components of the prior (SCALE's own)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model._utils import scatac_raw_counts_properties
from scvi.model.base._de_core import _de_core, _fdr_de_prediction

from scale_scvi.module import ATAC

from . import _peaks
from ._imputation import feature_names

_EPS = 1e-8
#: The columns of PEAKVI.differential_accessibility, in its order.
DA_COLUMNS = (
    "prob_da",
    "is_da_fdr",
    "bayes_factor",
    "effect_size",
    "emp_effect",
    "est_prob1",
    "est_prob2",
    "emp_prob1",
    "emp_prob2",
)


def _domain_fn(delta: float, two_sided: bool):
    """scvi-tools' ``m1_domain_fn``: the log-fold-change region that counts as differential.

    Two-sided: ``|lfc| >= delta`` in either direction (scvi-tools' default); one-sided: only
    ``lfc >= delta`` (group 1 more accessible)."""

    def m1_domain_fn(samples):
        plus = samples >= delta
        minus = samples <= -delta if two_sided else np.zeros_like(plus)
        return plus, minus

    return m1_domain_fn


def _check_groups(adata, groupby, group1, group2, idx1) -> None:
    """Clear errors for a ``groupby`` column or groups that are not there."""
    if idx1 is not None:
        return
    if groupby is None or groupby not in adata.obs:
        raise ValueError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); e.g. store model.get_cluster_assignments() in "
            "adata.obs['scale_cluster'] first, or give idx1 (and idx2)."
        )
    available = sorted(set(adata.obs[groupby].astype(str)))
    groups1 = [] if group1 is None else [group1] if isinstance(group1, str) else list(group1)
    for name, groups in (("group1", groups1), ("group2", [] if group2 is None else [group2])):
        bad = [g for g in groups if str(g) not in available]
        if bad:
            raise ValueError(
                f"{name}={bad} not among the values of obs[{groupby!r}]: {available}."
            )


def _peakvi_table(result: pd.DataFrame, mode: str, fdr_target: float) -> pd.DataFrame:
    """scvi-tools' DE table in PEAKVI's columns, plus the comparison columns it has."""
    table = pd.DataFrame(
        {
            "prob_da": result.proba_de if mode == "change" else result.proba_m1,
            "is_da_fdr": result[f"is_de_fdr_{fdr_target}"] if mode == "change" else None,
            "bayes_factor": result.bayes_factor,
            "effect_size": result.scale2 - result.scale1,
            "emp_effect": result.emp_mean2 - result.emp_mean1,
            "est_prob1": result.scale1,
            "est_prob2": result.scale2,
            "emp_prob1": result.emp_mean1,
            "emp_prob2": result.emp_mean2,
        }
        if "emp_mean1" in result
        else {
            "prob_da": result.proba_de if mode == "change" else result.proba_m1,
            "is_da_fdr": result[f"is_de_fdr_{fdr_target}"] if mode == "change" else None,
            "bayes_factor": result.bayes_factor,
            "effect_size": result.scale2 - result.scale1,
            "est_prob1": result.scale1,
            "est_prob2": result.scale2,
        }
    )
    for column in ("lfc_mean", "comparison", "group1", "group2"):
        if column in result:
            table[column] = result[column]
    return table


class DifferentialMixin:
    """:meth:`differential_accessibility` and :meth:`differential_accessibility_components`."""

    def differential_accessibility(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: Iterable[str] | str | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | Sequence[bool] | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | str | None = None,
        mode: Literal["vanilla", "change"] = "change",
        delta: float = 0.05,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Iterable[str] | None = None,
        batchid2: Iterable[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        two_sided: bool = True,
        pseudocounts: float | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        r"""Differential accessibility between groups of cells, with posterior statistics.

        :meth:`scvi.model.PEAKVI.differential_accessibility` on this model: the same
        arguments, the same computation (scvi-tools' :func:`~scvi.model.base._de_core` and
        :class:`~scvi.model.base.DifferentialComputation`, with
        :meth:`get_normalized_accessibility` at posterior samples, ``use_z_mean=False``, as
        the model function) and the same columns. ``"change"`` mode (Boyeau et al. 2019)
        tests the log2 fold change of the imputed probabilities against ``delta``;
        ``"vanilla"`` (Lopez et al. 2018) tests ``p1 > p2``.

        Parameters
        ----------
        adata
            Cells to compare (default: the model's data). SCALE's earlier signature took
            ``groupby`` first; as in PeakVI, ``adata`` comes first: pass ``groupby=`` by name.
        groupby
            Column of ``adata.obs`` with the groups (e.g. ``"scale_cluster"``).
        group1
            Group, or groups, to test (default: every group of ``groupby``, each against the
            rest).
        group2
            Group to compare with; ``None``: all other cells (one vs the rest).
        idx1, idx2
            Instead of ``groupby``: boolean masks, indices or an ``obs`` query string of the
            two populations (``idx2`` defaults to all other cells).
        mode
            ``"change"`` or ``"vanilla"``.
        delta
            Smallest log2 fold change that counts as differential (``"change"`` mode).
        batch_size
            Minibatch size of the imputation.
        all_stats
            Add the observed open fractions (``emp_prob1``, ``emp_prob2``, ``emp_effect``).
        batch_correction
            Decode every cell in each of the batches (``batchid1``/``batchid2``, default all)
            instead of its own, and compare batch with batch.
        batchid1, batchid2
            Batches to decode the two populations in, with ``batch_correction``.
        fdr_target
            Target of the posterior expected false discovery rate for ``is_da_fdr``.
        silent
            No progress bar.
        two_sided
            ``True``: differential in either direction; ``False``: only peaks more
            accessible in population 1 (``lfc >= delta``).
        pseudocounts
            Added to the probabilities before the log fold change; ``None`` estimates it
            from the data as scvi-tools does (for a MuData, 1e-6 as in MULTIVI).
        **kwargs
            Further arguments of
            :meth:`~scvi.model.base.DifferentialComputation.get_bayes_factors`.

        Returns
        -------
        :class:`pandas.DataFrame` indexed by peak, sorted by decreasing ``prob_da`` within
        each comparison, with PeakVI's columns: ``prob_da``, ``is_da_fdr``, ``bayes_factor``,
        ``effect_size`` (``est_prob2 - est_prob1``, PeakVI's sign), ``emp_effect``
        (``emp_prob2 - emp_prob1``), ``est_prob1``, ``est_prob2``, ``emp_prob1``,
        ``emp_prob2``; then ``lfc_mean`` (the posterior mean log2 fold change of 1 over 2)
        and, for groups of ``groupby``, ``comparison``, ``group1`` and ``group2`` (which
        PeakVI drops; they tell the comparisons of a one-vs-rest table apart).
        """
        if isinstance(adata, str):
            raise TypeError(
                f"differential_accessibility takes adata first, as PeakVI does, got the string "
                f"{adata!r}: pass the groups by name, e.g. "
                f"differential_accessibility(groupby={adata!r}, group1=...)."
            )
        self._check_if_trained(warn=False)
        if ATAC not in self.module.modalities:
            raise ValueError(
                "This model has no ATAC modality: set it up with SCALE.setup_mudata and an "
                "'atac_layer' modality to compare accessibility."
            )
        adata = self._validate_anndata(adata)
        _check_groups(adata, groupby, group1, group2, idx1)
        if group1 is not None and not isinstance(group1, str):
            group1 = [str(g) for g in group1]
        elif group1 is not None:
            group1 = str(group1)
        group2 = None if group2 is None else str(group2)
        x_key = self.module.registry_key(ATAC)
        var_idx = _selected_peaks(self)
        if pseudocounts is None and (x_key != REGISTRY_KEYS.X_KEY or var_idx is not None):
            # scvi-tools estimates it from all of X, which holds more than the model's peaks
            pseudocounts = 1e-6
        model_fn = partial(
            self.get_normalized_accessibility,
            use_z_mean=False,
            batch_size=batch_size,
            return_numpy=True,
        )
        obs_backup = None
        if groupby is not None and idx1 is None:
            # scvi-tools compares the groups as strings; the column is restored afterwards.
            obs_backup = adata.obs[groupby]
            adata.obs[groupby] = obs_backup.astype(str).to_numpy()
        try:
            # scvi-tools' progress bar writes to stdout: SCALE's progress goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                result = _de_core(
                    adata_manager=self.get_anndata_manager(adata, required=True),
                    model_fn=model_fn,
                    representation_fn=None,
                    groupby=groupby,
                    group1=group1,
                    group2=group2,
                    idx1=idx1,
                    idx2=idx2,
                    all_stats=all_stats,
                    all_stats_fn=partial(
                        scatac_raw_counts_properties, registry_key=x_key, var_idx=var_idx
                    ),
                    col_names=feature_names(self, adata, ATAC),
                    mode=mode,
                    batchid1=batchid1,
                    batchid2=batchid2,
                    delta=delta,
                    batch_correction=batch_correction,
                    fdr=fdr_target,
                    silent=silent,
                    m1_domain_fn=_domain_fn(delta, two_sided),
                    pseudocounts=pseudocounts,
                    **kwargs,
                )
        finally:
            if obs_backup is not None:
                adata.obs[groupby] = obs_backup
        return _peakvi_table(result, mode, fdr_target)

    @torch.inference_mode()
    def differential_accessibility_components(
        self,
        component1: int | Sequence[int] | None = None,
        component2: int | None = None,
        n_samples: int = 2000,
        mode: Literal["vanilla", "change"] = "change",
        delta: float = 0.05,
        fdr_target: float = 0.05,
        two_sided: bool = True,
        pseudocounts: float = 1e-6,
        batch: str | None = None,
        adata: AnnData | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Differential accessibility between mixture components of the prior.

        The model's own description of a cluster is its prior component
        ``N(mu_c, diag(sigma_c^2))``. Latent points are drawn from each component and
        decoded into peak probabilities (at batch ``batch``, as
        :meth:`get_cluster_specific_peaks` does), which gives each cluster's accessibility
        with the uncertainty the model has about it; the two sets of draws are then compared
        with the statistics of :meth:`differential_accessibility` (``"change"``: the
        posterior probability that ``|log2 fold change| >= delta``; ``"vanilla"``:
        ``P(p1 > p2)``), and the expected false discovery rate is controlled as there.
        Unlike :meth:`differential_accessibility` no cells are decoded, so the comparison
        does not depend on which cells were assigned to a cluster; the observed open
        fractions of the cells assigned to each component are reported beside it.

        Parameters
        ----------
        component1
            Component, or components, to test (default: every component that is the most
            probable one of at least one cell, each against the rest).
        component2
            Component to compare with; ``None``: the other components in use, drawn in
            proportion to the prior's weights.
        n_samples
            Latent draws per side.
        mode, delta, fdr_target, two_sided
            As in :meth:`differential_accessibility`.
        pseudocounts
            Added to the probabilities before the log fold change.
        batch
            Batch category to decode in (default: the first).
        adata, batch_size
            Cells that define the components in use and the observed open fractions.

        Returns
        -------
        :class:`pandas.DataFrame` indexed by peak with the columns of
        :meth:`differential_accessibility` (the ``emp_*`` ones from the cells assigned to the
        components), sorted by decreasing ``prob_da`` within each comparison.
        """
        self._check_if_trained(warn=False)
        if mode not in ("vanilla", "change"):
            raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}.")
        if not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}.")
        labels = self.get_cluster_assignments(adata, batch_size=batch_size)
        used = sorted(int(c) for c in labels.categories)
        n = self.module.n_centroids
        wanted = used if component1 is None else np.atleast_1d(component1).tolist()
        bad = [c for c in [*wanted, component2] if c is not None and not 0 <= int(c) < n]
        if bad:
            raise ValueError(f"components {bad} are out of range: the model has {n}.")
        names = feature_names(self, adata, ATAC)
        matrix = self.adata_manager.get_from_registry(self.module.registry_key(ATAC))
        var_idx = _selected_peaks(self)
        if var_idx is not None:
            matrix = matrix[:, var_idx]
        codes = np.asarray(labels.astype(int))
        tables = []
        for c1 in (int(c) for c in wanted):
            rest = [c for c in used if c != c1] if component2 is None else [int(component2)]
            if not rest:
                raise ValueError(
                    f"Component {c1} has nothing to be compared with: it is the only component "
                    "in use; name component2."
                )
            p1 = self._component_samples([c1], n_samples, batch)
            p2 = self._component_samples(rest, n_samples, batch)
            lfc = np.log2(p1 + pseudocounts) - np.log2(p2 + pseudocounts)
            if mode == "change":
                plus, minus = _domain_fn(delta, two_sided)(lfc)
                prob = np.maximum(plus.mean(0), minus.mean(0))
            else:
                prob = (p1 > p2).mean(0)
            g2 = "Rest" if component2 is None else str(int(component2))
            table = pd.DataFrame(
                {
                    "prob_da": prob,
                    "bayes_factor": np.log(prob + _EPS) - np.log(1 - prob + _EPS),
                    "est_prob1": p1.mean(0),
                    "est_prob2": p2.mean(0),
                    "lfc_mean": lfc.mean(0),
                },
                index=names.copy(),
            )
            table["effect_size"] = table["est_prob2"] - table["est_prob1"]
            emp1 = _open_fraction(matrix, codes == c1)
            emp2 = _open_fraction(matrix, np.isin(codes, rest))
            table["emp_prob1"], table["emp_prob2"], table["emp_effect"] = emp1, emp2, emp2 - emp1
            table = table.sort_values("prob_da", ascending=False, kind="stable")
            table["is_da_fdr"] = (
                _fdr_de_prediction(table["prob_da"], fdr=fdr_target) if mode == "change" else None
            )
            table["comparison"] = f"{c1} vs {g2}"
            table["group1"], table["group2"] = str(c1), g2
            tables.append(table)
        result = pd.concat(tables)
        return result[[*DA_COLUMNS, "lfc_mean", "comparison", "group1", "group2"]]

    def _component_samples(
        self, components: Sequence[int], n_samples: int, batch: str | None
    ) -> np.ndarray:
        """Peak probabilities decoded at ``n_samples`` draws from the prior mixture restricted
        to ``components`` (weights renormalized), shape ``(n_samples, n_peaks)``."""
        prior = self.module.prior
        idx = torch.as_tensor(list(components), device=self.device)
        weights = prior.weights[idx]
        pick = idx[torch.multinomial(weights / weights.sum(), n_samples, replacement=True)]
        std = prior.variances[pick].sqrt()
        z = prior.means[pick] + std * torch.randn_like(std)
        covs = _peaks._decoder_covariates(self, n_samples, batch)
        return self.module.decode(z, ATAC, **covs).cpu().numpy().astype(np.float64)


def _selected_peaks(model) -> np.ndarray | None:
    """Columns of the registered matrix that the model reads (``None``: all of them)."""
    index = getattr(model.module, "peak_index", None)
    return None if index is None else index.cpu().numpy()


def _open_fraction(matrix, rows: np.ndarray) -> np.ndarray:
    """Fraction of the cells ``rows`` in which each peak is open (nan without cells)."""
    if not rows.any():
        return np.full(matrix.shape[1], np.nan)
    return np.asarray((matrix[np.flatnonzero(rows)] > 0).mean(axis=0)).ravel()
