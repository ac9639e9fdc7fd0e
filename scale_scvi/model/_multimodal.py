"""Multimodal (MuData: RNA + ATAC) registration and outputs of the SCALE model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, fields
from scvi.module._constants import MODULE_KEYS

from scale_scvi.module import MultiSCALEVAE
from scale_scvi.module._multivae import (
    ATAC,
    ATAC_KEY,
    COMPONENT_MASK_KEY,
    MODALITIES,
    MODALITY_FLAG_KEY,
    PX_RNA_SCALE_KEY,
    QZM_COMPONENTS_KEY,
    QZV_COMPONENTS_KEY,
    RNA,
    RNA_KEY,
)

from ._feature_stats import mean_proportion, open_fraction
from ._validation import validate_accessibility_matrix

#: Values of the ``modality_key`` column and the modalities ``(atac, rna)`` they mean.
MODALITY_FLAG_VALUES: dict[str, tuple[bool, bool]] = {
    "paired": (True, True),
    "both": (True, True),
    "atac": (True, False),
    "accessibility": (True, False),
    "rna": (False, True),
    "expression": (False, True),
}

Modality = Literal["joint", "atac", "rna"]


def _mudata_matrix(mdata, mod: str, layer: str | None):
    adata = mdata.mod[mod]
    if layer is None:
        if adata.X is None:
            raise ValueError(f"mdata[{mod!r}].X is None: put the data in X or name a layer.")
        return adata.X, f"mdata[{mod!r}].X"
    if layer not in adata.layers:
        raise ValueError(
            f"Layer {layer!r} is not in mdata[{mod!r}].layers (available: "
            f"{list(adata.layers)}); pass one of those, or None to use X."
        )
    return adata.layers[layer], f"mdata[{mod!r}].layers[{layer!r}]"


def _rows_with_data(matrix) -> np.ndarray:
    """Boolean per row: has at least one non-zero value (dense, sparse or backed)."""
    n = matrix.shape[0]
    out = np.zeros(n, dtype=bool)
    step = 10_000
    for start in range(0, n, step):
        block = matrix[start : start + step]
        if hasattr(block, "getnnz"):
            block = block.tocsr()
            block.eliminate_zeros()
            out[start : start + step] = block.getnnz(axis=1) > 0
        else:
            out[start : start + step] = (np.asarray(block) != 0).any(1)
    return out


class MultimodalMixin:
    """``setup_mudata`` and the multimodal outputs of :class:`~scale_scvi.SCALE`."""

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        atac_layer: str | None = None,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        modality_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Register a MuData of paired scATAC-seq and scRNA-seq (or one of them) with SCALE.

        With both modalities the model is :class:`~scale_scvi.module.MultiSCALEVAE` (a
        mixture-of-experts posterior and the Gaussian-mixture prior shared by a Bernoulli
        ATAC decoder and a negative binomial RNA decoder); with ATAC alone it is the
        single-modality SCALE; with RNA alone, a GMM-prior VAE of the counts.

        Every modality must hold all cells of ``mdata`` in the same order. A cell that lacks
        a modality has an all-zero row in it, or is flagged in ``modality_key``.

        Parameters
        ----------
        mdata
            :class:`mudata.MuData` with the modalities named in ``modalities``.
        atac_layer
            Layer of the ATAC modality with the peak matrix (``None``: its ``X``); any value
            > 0 is read as accessible.
        rna_layer
            Layer of the RNA modality with raw counts (``None``: its ``X``).
        batch_key
            Column of ``obs`` with the batch of each cell.
        modality_key
            Column of ``obs`` saying which modalities each cell has: ``"paired"`` (or
            ``"both"``), ``"atac"`` (or ``"accessibility"``), ``"rna"`` (or
            ``"expression"``). Without it, a cell lacks a modality when its row is all zeros.
        categorical_covariate_keys, continuous_covariate_keys
            Columns of ``obs`` with further covariates.
        modalities
            Which modality of ``mdata`` each argument refers to, e.g.
            ``{"atac_layer": "atac", "rna_layer": "rna"}`` (the default). Leave out
            ``"rna_layer"`` (or ``"atac_layer"``) to register one modality only. Keys naming
            ``obs`` columns (``batch_key``, ...) map to a modality whose ``obs`` holds them;
            unmapped, they are columns of ``mdata.obs``.

        Examples
        --------
        >>> SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac", "rna_layer": "rna"})
        >>> model = SCALE(mdata, n_centroids=14)
        """
        from mudata import MuData

        if not isinstance(mdata, MuData):
            raise TypeError(
                f"setup_mudata takes a MuData, got {type(mdata).__name__}; for an AnnData use "
                "SCALE.setup_anndata."
            )
        if modalities is None:
            modalities = {"atac_layer": "atac", "rna_layer": "rna"}
        if not isinstance(modalities, dict):
            raise TypeError(f"modalities must be a dict, got {type(modalities).__name__}.")
        setup_method_args = cls._get_setup_method_args(**locals())
        modalities_ = cls._create_modalities_attr_dict(modalities, setup_method_args)
        mods = {m: modalities_[f"{m}_layer"] for m in MODALITIES}
        if all(v is None for v in mods.values()):
            raise ValueError(
                "No modality to register: map 'atac_layer' and/or 'rna_layer' to modalities of "
                f"mdata in `modalities` (mdata has {list(mdata.mod)})."
            )
        matrices = {}
        for m, mod in mods.items():
            if mod is None:
                continue
            if mod not in mdata.mod:
                raise ValueError(
                    f"Modality {mod!r} (for {m}_layer) is not in mdata.mod (available: "
                    f"{list(mdata.mod)}); set modalities={{'{m}_layer': <name>, ...}}."
                )
            adata = mdata.mod[mod]
            if adata.n_obs != mdata.n_obs or not adata.obs_names.equals(mdata.obs_names):
                raise ValueError(
                    f"mdata[{mod!r}] does not hold the cells of mdata in the same order "
                    f"({adata.n_obs} vs {mdata.n_obs} cells). Give every modality all cells, in "
                    "mdata's order, with all-zero rows for cells that lack it (or flag them "
                    "with modality_key)."
                )
            matrix, what = _mudata_matrix(mdata, mod, atac_layer if m == ATAC else rna_layer)
            validate_accessibility_matrix(matrix, what)
            matrices[m] = matrix

        for arg in ("batch_key", "modality_key"):
            key = locals()[arg]
            _check_obs_key(mdata, key, modalities_[arg], arg)
        for arg in ("categorical_covariate_keys", "continuous_covariate_keys"):
            for key in locals()[arg] or []:
                _check_obs_key(mdata, key, modalities_[arg], arg)

        flags = np.ones((mdata.n_obs, len(MODALITIES)), dtype=bool)
        if modality_key is not None:
            obs = (
                mdata.obs
                if modalities_.modality_key is None
                else (mdata.mod[modalities_.modality_key].obs)
            )
            values = obs[modality_key].astype(str).to_numpy()
            unknown = sorted(set(values) - set(MODALITY_FLAG_VALUES))
            if unknown:
                raise ValueError(
                    f"obs[{modality_key!r}] has values {unknown[:5]} that name no modality; "
                    f"use {sorted(MODALITY_FLAG_VALUES)}."
                )
            flags = np.array([MODALITY_FLAG_VALUES[v] for v in values], dtype=bool)
        has_any = np.zeros(mdata.n_obs, dtype=bool)
        for m, matrix in matrices.items():
            has_any |= _rows_with_data(matrix) & flags[:, MODALITIES.index(m)]
        if len(matrices) > 1 and not has_any.all():
            bad = mdata.obs_names[~has_any]
            raise ValueError(
                f"{len(bad)} cells have no data in any registered modality (e.g. "
                f"{list(bad[:3])}); remove them before setup_mudata."
            )

        both = len(matrices) == 2
        mudata_fields = [
            fields.MuDataCategoricalObsField(
                REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=modalities_.batch_key
            ),
            fields.MuDataCategoricalJointObsField(
                REGISTRY_KEYS.CAT_COVS_KEY,
                categorical_covariate_keys,
                mod_key=modalities_.categorical_covariate_keys,
            ),
            fields.MuDataNumericalJointObsField(
                REGISTRY_KEYS.CONT_COVS_KEY,
                continuous_covariate_keys,
                mod_key=modalities_.continuous_covariate_keys,
            ),
        ]
        if modality_key is not None:
            mudata_fields.append(
                fields.MuDataCategoricalObsField(
                    MODALITY_FLAG_KEY, modality_key, mod_key=modalities_.modality_key
                )
            )
        if mods[RNA] is not None:
            mudata_fields.append(
                fields.MuDataLayerField(
                    REGISTRY_KEYS.X_KEY,
                    rna_layer,
                    mod_key=mods[RNA],
                    is_count_data=True,
                    mod_required=True,
                )
            )
        if mods[ATAC] is not None:
            mudata_fields.append(
                fields.MuDataLayerField(
                    REGISTRY_KEYS.ATAC_X_KEY if both else REGISTRY_KEYS.X_KEY,
                    atac_layer,
                    mod_key=mods[ATAC],
                    is_count_data=False,
                    mod_required=True,
                )
            )
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ helpers
    def _registered_modalities(self) -> tuple[str, ...]:
        """``("atac",)`` for AnnData; the modalities given to ``setup_mudata`` otherwise."""
        registry = self.adata_manager.registry
        if registry.get("setup_method_name") != "setup_mudata":
            return (ATAC,)
        mapping = registry["setup_args"].get("modalities") or {}
        return tuple(m for m in MODALITIES if mapping.get(f"{m}_layer") is not None)

    @property
    def is_multimodal(self) -> bool:
        """Whether the module is the mixture-of-experts :class:`MultiSCALEVAE`."""
        return isinstance(self.module, MultiSCALEVAE)

    def _multimodal_module(self, **module_kwargs) -> MultiSCALEVAE:
        """The :class:`MultiSCALEVAE` for the registered modalities."""
        registered = self._registered_modalities()
        stats = self.summary_stats
        n_atac = 0
        if ATAC in registered:
            n_atac = stats["n_atac"] if RNA in registered else stats["n_vars"]
        n_rna = stats["n_vars"] if RNA in registered else 0
        flags = None
        if MODALITY_FLAG_KEY in self.adata_manager.data_registry:
            state = self.adata_manager.get_state_registry(MODALITY_FLAG_KEY)
            flags = [MODALITY_FLAG_VALUES[str(c)] for c in state.categorical_mapping]
        module = MultiSCALEVAE(
            n_input_atac=n_atac, n_input_rna=n_rna, modality_flags=flags, **module_kwargs
        )
        module.init_decoder_bias(
            atac_open_fraction=(
                open_fraction(self.adata_manager.get_from_registry(ATAC_KEY))
                if ATAC in registered
                else None
            ),
            rna_mean_proportion=(
                mean_proportion(self.adata_manager.get_from_registry(RNA_KEY))
                if RNA in registered
                else None
            ),
        )
        return module

    def _latent_mean(self, inference_outputs: dict, modality: Modality = "joint"):
        """Posterior mean of the joint posterior or of one modality's expert."""
        if self.is_multimodal:
            return self.module.latent_mean(inference_outputs, modality)
        if modality not in ("joint", ATAC):
            raise ValueError(
                f"modality={modality!r} needs a model set up with SCALE.setup_mudata on RNA and "
                "ATAC; this model has ATAC only (use 'joint' or 'atac')."
            )
        return inference_outputs[MODULE_KEYS.QZM_KEY]

    def _latent_point(self, inference_outputs: dict, modality: Modality, use_z_mean: bool):
        """The posterior mean, or a sample, of the joint posterior or of one expert."""
        z = self._latent_mean(inference_outputs, modality)
        if use_z_mean:
            return z
        if modality == "joint":
            return inference_outputs[MODULE_KEYS.Z_KEY]
        qz_v = (
            inference_outputs[f"qzv_{modality}"]
            if self.is_multimodal
            else (inference_outputs[MODULE_KEYS.QZV_KEY])
        )
        return z + qz_v.sqrt() * torch.randn_like(z)

    def _cluster_probabilities(self, inference_outputs: dict, modality: Modality = "joint"):
        """Cluster probabilities of one minibatch (see :meth:`get_cluster_probabilities`)."""
        if self.is_multimodal and modality == "joint":
            return self.module.joint_cluster_probabilities(inference_outputs)
        return self.module.cluster_probabilities(self._latent_mean(inference_outputs, modality))

    def _aggregate_posterior_components(self, inference_outputs: dict):
        """Means and variances of the Gaussians whose mixture is the aggregate posterior.

        For a multimodal model those are the mixture components of every cell (its experts,
        and their product with ``posterior="mopoe"``), not the moments of each cell's mixture,
        which would blur experts that disagree into one wide Gaussian.
        """
        if not self.is_multimodal:
            return inference_outputs[MODULE_KEYS.QZM_KEY], inference_outputs[MODULE_KEYS.QZV_KEY]
        mask = inference_outputs[COMPONENT_MASK_KEY].bool()  # (C, B)
        return (
            inference_outputs[QZM_COMPONENTS_KEY][mask],
            inference_outputs[QZV_COMPONENTS_KEY][mask],
        )

    def _check_has_atac(self) -> None:
        if self.is_multimodal and ATAC not in self.module.modalities:
            raise ValueError(
                "This model has no ATAC modality: set it up with SCALE.setup_mudata and an "
                "'atac_layer' modality to impute accessibility."
            )

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        modality: Modality = "joint",
        joint_mean: Literal["mixture", "precision"] = "mixture",
        **kwargs,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of each cell.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to embed, as in scvi-tools.
        give_mean
            Posterior means (default) rather than one sample per cell.
        mc_samples
            Unused; kept for scvi-tools' signature.
        return_dist
            Return ``(means, variances)``; for ``"joint"`` those of the mixture of experts.
        modality
            ``"joint"``: the mixture-of-experts posterior (its mean is the average of the
            means of the modalities the cell has); ``"atac"`` or ``"rna"``: that modality's
            posterior alone.
        joint_mean
            For ``modality="joint"`` of a model with both modalities: ``"mixture"`` (the
            mixture of experts' own mean and variance) or ``"precision"`` (the normalized
            product of the experts the cell has, each weighted by its certainty; see
            :meth:`~scale_scvi.module.MultiSCALEVAE.precision_weighted_moments`). With one
            modality, or for one expert, both are the same.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``, or the pair of means and variances.
        """
        if joint_mean not in ("mixture", "precision"):
            raise ValueError(
                f"joint_mean={joint_mean!r} is not one of 'mixture' (the mixture of experts' "
                "mean) and 'precision' (the precision-weighted product of the experts)."
            )
        if not self.is_multimodal:
            self._latent_mean({MODULE_KEYS.QZM_KEY: None}, modality)  # raises for RNA
            return super().get_latent_representation(
                adata=adata,
                indices=indices,
                give_mean=give_mean,
                mc_samples=mc_samples,
                batch_size=batch_size,
                return_dist=return_dist,
                **kwargs,
            )
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        means, variances = [], []
        for tensors in loader:
            out = self.module.inference(**self.module._get_inference_input(tensors))
            if modality == "joint" and joint_mean == "precision":
                qz_m, qz_v = self.module.precision_weighted_moments(out)
                point = qz_m if give_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            else:
                qz_v = out[MODULE_KEYS.QZV_KEY if modality == "joint" else f"qzv_{modality}"]
                point = self._latent_point(out, modality, give_mean)
            means.append(point.cpu())
            variances.append(qz_v.cpu())
        if return_dist:
            return torch.cat(means).numpy(), torch.cat(variances).numpy()
        return torch.cat(means).numpy()

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        modality: Modality = "joint",
        library_size: float | Literal["observed"] = 1.0,
        use_z_mean: bool = True,
    ) -> np.ndarray:
        """Expected expression: the RNA decoder's gene proportions times a library size.

        With ``modality="atac"`` the cells are encoded from their accessibility alone, which
        predicts expression from ATAC (cross-modal prediction).

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in scvi-tools.
        modality
            Posterior to decode: ``"joint"``, ``"atac"`` (RNA from ATAC) or ``"rna"``.
        library_size
            Scale of each row: a number (1 gives proportions summing to one), or
            ``"observed"`` for each cell's RNA library size (0 for cells without RNA).
        use_z_mean
            Decode the posterior mean (default) rather than a sample.

        Returns
        -------
        ``float32`` array of shape ``(n_cells, n_genes)``.
        """
        if not self.is_multimodal or RNA not in self.module.modalities:
            raise ValueError(
                "get_normalized_expression needs RNA: set the model up with SCALE.setup_mudata "
                "and an 'rna_layer' modality."
            )
        if not (library_size == "observed" or isinstance(library_size, int | float)):
            raise ValueError(f"library_size must be a number or 'observed', got {library_size!r}.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        blocks = []
        for tensors in loader:
            inf = self.module.inference(**self.module._get_inference_input(tensors))
            z = self._latent_point(inf, modality, use_z_mean)
            gen_in = self.module._get_generative_input(tensors, {MODULE_KEYS.Z_KEY: z})
            gen = self.module.generative(**gen_in)
            out = gen[PX_RNA_SCALE_KEY]
            if library_size == "observed":
                out = out * gen_in[MODULE_KEYS.LIBRARY_KEY].to(out.device)
            else:
                out = out * float(library_size)
            blocks.append(out.cpu().numpy())
        return np.concatenate(blocks, axis=0)


def _check_obs_key(mdata, key: str | None, mod: str | None, argument: str) -> None:
    if key is None:
        return
    if mod is not None and mod not in mdata.mod:
        raise ValueError(
            f"modalities[{argument!r}]={mod!r} is not a modality of mdata ({list(mdata.mod)})."
        )
    obs = mdata.obs if mod is None else mdata.mod[mod].obs
    where = "mdata.obs" if mod is None else f"mdata[{mod!r}].obs"
    if key not in obs:
        raise ValueError(f"{argument}={key!r} is not a column of {where} ({list(obs.columns)}).")
