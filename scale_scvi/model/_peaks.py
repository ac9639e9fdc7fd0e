"""Cluster-specific peaks: decoded mixture components."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass

from scale_scvi.module import ATAC, MODULE_KEYS

_EPS = 1e-6


def _decoder_covariates(
    model: BaseModelClass, n: int, batch: str | None
) -> dict[str, torch.Tensor | None]:
    """Covariates at which the component means are decoded.

    The batch is ``batch`` (default: the first category); further categorical covariates take
    their first category and continuous covariates their mean over the registered cells.
    """
    manager = model.adata_manager
    registry = manager.data_registry
    device = model.device
    covs: dict[str, torch.Tensor | None] = {
        MODULE_KEYS.BATCH_INDEX_KEY: None,
        MODULE_KEYS.CONT_COVS_KEY: None,
        MODULE_KEYS.CAT_COVS_KEY: None,
    }
    mapping = list(manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping)
    if batch is not None and batch not in mapping:
        raise ValueError(f"batch={batch!r} is not one of the model's batches {mapping}.")
    code = 0 if batch is None else mapping.index(batch)
    covs[MODULE_KEYS.BATCH_INDEX_KEY] = torch.full((n, 1), code, device=device)
    if REGISTRY_KEYS.CAT_COVS_KEY in registry:
        n_keys = len(manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).field_keys)
        covs[MODULE_KEYS.CAT_COVS_KEY] = torch.zeros((n, n_keys), dtype=torch.long, device=device)
    if REGISTRY_KEYS.CONT_COVS_KEY in registry:
        values = np.asarray(manager.get_from_registry(REGISTRY_KEYS.CONT_COVS_KEY), dtype=float)
        mean = torch.as_tensor(values.mean(0), dtype=torch.float32, device=device)
        covs[MODULE_KEYS.CONT_COVS_KEY] = mean.expand(n, -1)
    return covs


def peak_names(model: BaseModelClass, adata=None) -> pd.Index:
    """Names of the peaks the model reads: ``var_names`` of the AnnData, or of the ATAC
    modality of a MuData, those selected by ``setup_anndata`` / ``setup_mudata``."""
    data = model._validate_anndata(adata)
    registry = model.adata_manager.registry
    index = getattr(model.module, "peak_index", None)
    if registry.get("setup_method_name") != "setup_mudata":
        return data.var_names if index is None else data.var_names[index.cpu().numpy()]
    mod = (registry["setup_args"].get("modalities") or {}).get("atac_layer")
    if mod is None:
        raise ValueError(
            "This model has no ATAC modality, so no peaks: set it up with SCALE.setup_mudata "
            "and an 'atac_layer' modality."
        )
    names = data.mod[mod].var_names
    return names if index is None else names[index.cpu().numpy()]


def used_components(
    model: BaseModelClass, adata: AnnData | None, batch_size: int | None
) -> list[int]:
    """Clusters (labels of ``get_cluster_assignments``) that are the most probable one of at
    least one cell."""
    probs = model.get_cluster_probabilities(adata, batch_size=batch_size)
    return sorted(np.unique(probs.argmax(1)).tolist())


@torch.inference_mode()
def component_accessibility(
    model: BaseModelClass,
    components: Sequence[int],
    batch: str | None = None,
) -> np.ndarray:
    """Decoder probabilities of every peak read at the mean of each cluster's component.

    ``components`` are cluster labels (``0 .. n_clusters_ - 1``).

    Returns
    -------
    Array of shape ``(len(components), n_peaks)``.
    """
    module = model.module
    index = model._cluster_components()[np.asarray(list(components), dtype=np.int64)]
    means = module.prior.means[torch.as_tensor(index, device=model.device)]
    covs = _decoder_covariates(model, len(components), batch)
    return module.decode(means, ATAC, **covs).cpu().numpy()


def rank_specific_peaks(
    probs: np.ndarray,
    components: Sequence[int],
    peak_names: Sequence[str],
    n_top: int | None = 100,
    rest: Literal["mean", "max"] = "mean",
) -> pd.DataFrame:
    """Rank peaks by their accessibility in one component against the others.

    Parameters
    ----------
    probs
        Probabilities, shape ``(n_components, n_peaks)``.
    components
        Component index of each row of ``probs``.
    peak_names
        Names of the peaks (columns).
    n_top
        Peaks kept per component (``None``: all).
    rest
        Compare with the ``"mean"`` of the other components or with their ``"max"`` (stricter:
        the peak must be more open in this component than in every other one).

    Returns
    -------
    Long table with columns ``component`` (str), ``peak``, ``rank`` (1 = most specific),
    ``p_component``, ``p_rest``, ``score = p_component - p_rest`` and ``log2_fold_change``.
    """
    if rest not in ("mean", "max"):
        raise ValueError(f"rest must be 'mean' or 'max', got {rest!r}.")
    if n_top is not None and n_top < 1:
        raise ValueError(f"n_top must be a positive integer or None, got {n_top}.")
    probs = np.asarray(probs, dtype=np.float64)
    n_comp, n_peaks = probs.shape
    if n_comp < 2:
        raise ValueError(
            "Cluster-specific peaks need at least two components to compare; only one "
            "component is in use."
        )
    names = np.asarray(peak_names)
    k = n_peaks if n_top is None else min(n_top, n_peaks)
    tables = []
    for row, comp in enumerate(components):
        others = np.delete(probs, row, axis=0)
        p_rest = others.mean(0) if rest == "mean" else others.max(0)
        score = probs[row] - p_rest
        top = np.argsort(-score, kind="stable")[:k]
        tables.append(
            pd.DataFrame(
                {
                    "component": str(comp),
                    "peak": names[top],
                    "rank": np.arange(1, k + 1),
                    "p_component": probs[row, top],
                    "p_rest": p_rest[top],
                    "score": score[top],
                    "log2_fold_change": np.log2((probs[row, top] + _EPS) / (p_rest[top] + _EPS)),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)
