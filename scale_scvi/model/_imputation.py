"""Decoded outputs of the SCALE model with PeakVI's and MULTIVI's arguments."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Number
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model._utils import _get_batch_code_from_category

from scale_scvi.module import ATAC, MODULE_KEYS, RNA, Modality

from . import _peaks


def feature_names(model, adata, modality: str) -> pd.Index:
    """Names of the features of ``modality``: ``var_names`` of the AnnData, or of the
    modality's AnnData in a MuData."""
    if modality == ATAC:
        return _peaks.peak_names(model, adata)  # the peaks setup_anndata selected
    data = model._validate_anndata(adata)
    registry = model.adata_manager.registry
    mod = (registry["setup_args"].get("modalities") or {}).get(f"{modality}_layer")
    if mod is None:
        raise ValueError(
            f"This model has no {modality!r} modality: set it up with SCALE.setup_mudata and "
            f"a '{modality}_layer' modality."
        )
    return data.mod[mod].var_names


def _feature_mask(names: pd.Index, wanted: Sequence[str] | None, argument: str):
    """Column selector of ``wanted`` (in the model's order) among ``names``."""
    if wanted is None:
        return slice(None)
    if isinstance(wanted, str):
        raise TypeError(f"{argument} takes a list of names, got the string {wanted!r}.")
    mask = names.isin(list(wanted))
    missing = sorted(set(wanted) - set(names[mask]))
    if missing:
        raise ValueError(
            f"{argument}: {len(missing)} names are not features of the model, e.g. "
            f"{missing[:5]}; pick names from the model's var_names."
        )
    return mask


def _cell_indices(adata, indices, n_samples_overall: int | None) -> np.ndarray:
    """``indices`` (default: all cells), or ``n_samples_overall`` of them drawn with
    replacement, as scvi-tools does (with torch's generator, which ``scvi.settings.seed``
    seeds)."""
    indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
    if indices.dtype == bool:
        indices = np.flatnonzero(indices)
    if n_samples_overall is not None:
        indices = indices[torch.randint(len(indices), (n_samples_overall,)).numpy()]
    return indices


class ImputationMixin:
    """:meth:`get_normalized_accessibility` and :meth:`get_normalized_expression`."""

    @torch.inference_mode()
    def get_normalized_accessibility(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples_overall: int | None = None,
        region_list: Sequence[str] | None = None,
        transform_batch: str | int | Sequence[str | int] | None = None,
        use_z_mean: bool = True,
        threshold: float | None = None,
        normalize_cells: bool = False,
        normalize_regions: bool = False,
        batch_size: int | None = None,
        return_numpy: bool | None = None,
        modality: Modality = "joint",
    ) -> np.ndarray | sp.csr_matrix | pd.DataFrame:
        """Imputed accessibility: the decoder's probability that each peak is open.

        The arguments of :meth:`scvi.model.PEAKVI.get_normalized_accessibility`, with the
        same meaning, and ``modality`` for a multimodal model.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to impute, as in scvi-tools.
        n_samples_overall
            Draw this many cells (with replacement) from ``indices``, as PeakVI does.
        region_list
            Return these peaks only (in the model's order).
        transform_batch
            Batch to decode in: ``None`` (the cell's own), a batch category, or a list of
            categories whose probabilities are averaged.
        use_z_mean
            Decode the posterior mean (default) rather than a sample.
        threshold
            If given, probabilities below it are set to zero and a sparse matrix is returned,
            built minibatch by minibatch (the dense matrix never exists).
            ``threshold=0.5`` gives a binarized imputation's support with its probabilities.
        normalize_cells
            ``False`` (default): the probabilities of a cell of the training data's mean
            depth (depth corrected). ``True``: at each cell's own number of open peaks (the
            model's depth offset added back), closer to the input.
        normalize_regions
            Must be ``False``. PeakVI's region factors have no counterpart here: each peak's
            own rate is the decoder's output bias and is always part of the probabilities.
        return_numpy
            ``None`` (default) or ``True``: a dense ``float32`` array, or CSR with
            ``threshold``. ``False``: a :class:`pandas.DataFrame` (sparse with ``threshold``)
            with cell and peak names, as PeakVI returns by default. The default differs from
            PeakVI's because the imputation usually goes to ``adata.layers`` (which takes an
            array or CSR, not a DataFrame) and a sparse DataFrame is slow to build and use.
        modality
            For a multimodal model, the posterior to decode: ``"joint"``, ``"atac"``, or
            ``"rna"`` (accessibility predicted from expression alone).

        Returns
        -------
        ``(n_cells, n_peaks)`` array, CSR matrix or DataFrame (see ``return_numpy``).
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
        if normalize_regions:
            raise ValueError(
                "normalize_regions=True has no meaning for SCALE: it has no region factors to "
                "reintroduce (each peak's own rate is the decoder's bias and is always in the "
                "probabilities); leave normalize_regions=False."
            )
        if ATAC not in self.module.modalities:
            raise ValueError(
                "This model has no ATAC modality: set it up with SCALE.setup_mudata and an "
                "'atac_layer' modality to impute accessibility."
            )
        self.module.check_modality(modality)
        adata = self._validate_anndata(adata)
        indices = _cell_indices(adata, indices, n_samples_overall)
        names = feature_names(self, adata, ATAC)
        mask = _feature_mask(names, region_list, "region_list")
        blocks = []
        for p in self._decoded(
            adata,
            indices,
            batch_size,
            ATAC,
            modality,
            use_z_mean,
            transform_batch=transform_batch,
            at_observed_depth=normalize_cells,
        ):
            p = p[0][:, mask]
            if threshold is not None:
                p = sp.csr_matrix(np.where(p >= threshold, p, np.float32(0)))
            blocks.append(p)
        imputed = (
            np.concatenate(blocks, axis=0)
            if threshold is None
            else sp.vstack(blocks, format="csr")
        )
        if return_numpy is None or return_numpy:
            return imputed
        index, columns = adata.obs_names[indices], names[mask]
        if threshold is None:
            return pd.DataFrame(imputed, index=index, columns=columns)
        return pd.DataFrame.sparse.from_spmatrix(imputed, index=index, columns=columns)

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples_overall: int | None = None,
        transform_batch: Sequence[Number | str] | None = None,
        gene_list: Sequence[str] | None = None,
        use_z_mean: bool = True,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = False,
        return_numpy: bool | None = None,
        silent: bool = True,
        modality: Modality = "joint",
        library_size: float | Literal["observed"] = 1.0,
    ) -> np.ndarray | pd.DataFrame:
        """Expected expression: the RNA decoder's gene proportions times a library size.

        The arguments of :meth:`scvi.model.MULTIVI.get_normalized_expression`, with the same
        meaning, and ``modality`` and ``library_size``. With ``modality="atac"`` the cells are
        encoded from their accessibility alone, which predicts expression from ATAC
        (cross-modal prediction).

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in scvi-tools.
        n_samples_overall
            Draw this many cells (with replacement) from ``indices``.
        transform_batch
            Batch to decode in: ``None`` (the cell's own), a category, or a list of
            categories whose outputs are averaged.
        gene_list
            Return these genes only (in the model's order).
        use_z_mean
            Decode the posterior mean (default) rather than samples.
        n_samples
            Posterior samples per cell (with ``use_z_mean=False``).
        return_mean
            With ``n_samples > 1``, average the samples (else a leading samples axis).
        return_numpy
            ``None`` (default) or ``True``: an array; ``False``: a :class:`pandas.DataFrame`
            with cell and gene names (MULTIVI's default; see
            :meth:`get_normalized_accessibility` for why SCALE's default is the array).
        silent
            Unused (no progress bar); kept for MULTIVI's signature.
        modality
            Posterior to decode: ``"joint"``, ``"atac"`` (RNA from ATAC) or ``"rna"``.
        library_size
            Scale of each row: a number (1 gives proportions summing to one), or
            ``"observed"`` for each cell's RNA library size (0 for cells without RNA).

        Returns
        -------
        ``float32`` array or DataFrame of shape ``(n_cells, n_genes)``; with ``n_samples > 1``
        and ``return_mean=False`` an array of shape ``(n_samples, n_cells, n_genes)``.
        """
        if RNA not in self.module.modalities:
            raise ValueError(
                "get_normalized_expression needs RNA: set the model up with SCALE.setup_mudata "
                "and an 'rna_layer' modality."
            )
        if not (library_size == "observed" or isinstance(library_size, int | float)):
            raise ValueError(f"library_size must be a number or 'observed', got {library_size!r}.")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        self.module.check_modality(modality)
        adata = self._validate_anndata(adata)
        indices = _cell_indices(adata, indices, n_samples_overall)
        names = feature_names(self, adata, RNA)
        mask = _feature_mask(names, gene_list, "gene_list")
        scale = None if library_size == "observed" else float(library_size)
        blocks = [
            b[:, :, mask]
            for b in self._decoded(
                adata,
                indices,
                batch_size,
                RNA,
                modality,
                use_z_mean,
                library_size=scale,
                transform_batch=transform_batch,
                n_samples=n_samples,
            )
        ]
        exprs = np.concatenate(blocks, axis=1)
        if n_samples == 1 or return_mean:
            exprs = exprs.mean(0)
        elif return_numpy is False:
            raise ValueError(
                "n_samples > 1 with return_mean=False gives a 3-d array: pass return_numpy=True "
                "or return_mean=True."
            )
        if return_numpy is None or return_numpy:
            return exprs
        return pd.DataFrame(exprs, index=adata.obs_names[indices], columns=names[mask])

    def _decoded(
        self,
        adata,
        indices,
        batch_size,
        target: str,
        modality: Modality,
        use_z_mean: bool,
        library_size: float | None = 1.0,
        transform_batch=None,
        n_samples: int = 1,
        at_observed_depth: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield, minibatch by minibatch, ``target`` decoded from ``modality``'s posterior,
        times ``library_size`` (``None``: each cell's observed library), averaged over the
        batches ``transform_batch``: arrays of shape ``(n_samples, cells, features)``.

        ``at_observed_depth``: ATAC probabilities at each cell's own depth."""
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        batch_codes = _get_batch_code_from_category(
            self.get_anndata_manager(adata, required=True), transform_batch
        )
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        for tensors in loader:
            out = self.module.inference(**self.module._get_inference_input(tensors))
            draws = []
            for _ in range(n_samples):
                if use_z_mean:
                    z = self.module.latent_moments(out, modality)[0]
                else:
                    z = self.module.latent_sample(out, modality)
                draws.append(z)
            z = torch.stack(draws)
            value = 0.0
            for code in batch_codes:
                covs = {
                    k: v.to(z.device) if v is not None else None
                    for k, v in self.module.covariates(tensors).items()
                }
                if code is not None:
                    batch = tensors[REGISTRY_KEYS.BATCH_KEY]
                    covs[MODULE_KEYS.BATCH_INDEX_KEY] = torch.full_like(batch, code).to(z.device)
                decoded = torch.stack([self.module.decode(zi, target, **covs) for zi in z])
                value = value + decoded / len(batch_codes)
            if at_observed_depth:
                value = self._at_observed_depth(value, tensors)
            if library_size is None:
                value = value * self.module.observed_library(tensors, target).to(value.device)
            elif library_size != 1.0:
                value = value * library_size
            yield value.cpu().numpy()

    def _at_observed_depth(self, p: torch.Tensor, tensors) -> torch.Tensor:
        """Probabilities ``p`` of a cell of the mean depth moved to each cell's own depth."""
        x = self.module.select_peaks(tensors[self.module.registry_key(ATAC)])
        x = (x if x.layout == torch.strided else x.to_dense()).to(p.device)
        offset = self.module.depth_logit_offset((x > 0).to(p.dtype))
        return self.module.open_probability(self.module.inverse_link(p) + offset)
