"""Multimodal (MuData: RNA + ATAC) registration and outputs of the SCALE model."""

from __future__ import annotations

import numpy as np
from scvi import REGISTRY_KEYS
from scvi.data import fields

from scale_scvi.module import ATAC, ATAC_KEY, MODALITIES, MODALITY_FLAG_KEY, RNA, RNA_KEY

from ._canonical import CanonicalAnnDataManager, warn_if_not_canonical
from ._peak_selection import (
    MIN_OPEN_SHARE,
    N_MIN_PEAKS,
    N_TOP_PEAKS,
    MuDataPeakLayerField,
    check_setup_selection,
)
from ._validation import validate_accessibility_matrix, validate_covariate_values

#: Values of the ``modality_key`` column and the modalities ``(atac, rna)`` they mean.
MODALITY_FLAG_VALUES: dict[str, tuple[bool, bool]] = {
    "paired": (True, True),
    "both": (True, True),
    "atac": (True, False),
    "accessibility": (True, False),
    "rna": (False, True),
    "expression": (False, True),
}


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


class MuDataSetupMixin:
    """``setup_mudata`` of :class:`~scale_scvi.SCALE`: which modalities a model has."""

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
        min_cells: int | None = None,
        min_fraction: float | None = None,
        n_top_peaks: int | None = N_TOP_PEAKS,
        n_min_peaks: int | None = N_MIN_PEAKS,
        min_open_share: float | None = MIN_OPEN_SHARE,
        **kwargs,
    ) -> None:
        """Register a MuData of paired scATAC-seq and scRNA-seq (or one of them) with SCALE.

        With both modalities the module is :class:`~scale_scvi.module.MultiSCALEVAE` (a
        posterior mixing the two modalities' experts and their product, and the
        Gaussian-mixture prior shared by a Bernoulli ATAC decoder and a negative binomial RNA
        decoder); with ATAC alone it is the single-modality
        :class:`~scale_scvi.module.SCALEVAE`; with RNA alone, a GMM-prior VAE of the counts.
        The model's methods are the same for all of them.

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
        min_cells, min_fraction, n_top_peaks, n_min_peaks, min_open_share
            The ATAC peaks the model reads, as in :meth:`setup_anndata`: those open in at
            least ``max(min_cells, ceil(min_fraction * n_cells))`` cells, then at most
            ``n_top_peaks`` of them, the ones open in the most cells (and at least the
            ``n_min_peaks`` most often open when fewer reach ``min_fraction``, and the most
            often open ones that hold ``min_open_share`` of the open entries when those that
            reach it hold less). The choice is
            recorded and applied again to any data given to the model later
            (:attr:`~scale_scvi.SCALE.selected_peaks_` names the peaks). By default only the
            cap applies (at most 50,000 peaks, as in :meth:`setup_anndata`), not the 1 %
            fraction: the ATAC of a paired assay is often much shallower than that of an
            ATAC-only one (on the sci-CAR kidney pair, about 15 open peaks per cell, 18 of
            its 10,000 peaks are open in 1 % of the cells). ``n_top_peaks=None`` reads
            every peak.

        Examples
        --------
        >>> SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac", "rna_layer": "rna"})
        >>> model = SCALE(mdata, n_centroids=14)
        """
        if modalities is None:
            modalities = {"atac_layer": "atac", "rna_layer": "rna"}
        # Before any other local, so that only the arguments are recorded (and saved).
        setup_method_args = cls._get_setup_method_args(**locals())
        check_setup_selection(min_cells, min_fraction, n_top_peaks, n_min_peaks, min_open_share)
        from mudata import MuData

        if not isinstance(mdata, MuData):
            raise TypeError(
                f"setup_mudata takes a MuData, got {type(mdata).__name__}; for an AnnData use "
                "SCALE.setup_anndata."
            )
        if not isinstance(modalities, dict):
            raise TypeError(f"modalities must be a dict, got {type(modalities).__name__}.")
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
            validate_accessibility_matrix(matrix, what, expression=m == RNA, setup="setup_mudata")
            if "source_registry" not in kwargs:
                warn_if_not_canonical(matrix, what)
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
                    RNA_KEY,
                    rna_layer,
                    mod_key=mods[RNA],
                    is_count_data=True,
                    mod_required=True,
                )
            )
        if mods[ATAC] is not None:
            mudata_fields.append(
                MuDataPeakLayerField(
                    ATAC_KEY if both else REGISTRY_KEYS.X_KEY,
                    atac_layer,
                    min_cells=min_cells,
                    min_fraction=min_fraction,
                    n_top_peaks=n_top_peaks,
                    n_min_peaks=n_min_peaks,
                    min_open_share=min_open_share,
                    setup="setup_mudata",
                    mod_key=mods[ATAC],
                    mod_required=True,
                )
            )
        adata_manager = CanonicalAnnDataManager(
            fields=mudata_fields, setup_method_args=setup_method_args
        )
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

    def _modality_flags(self) -> list[tuple[bool, bool]] | None:
        """Modalities ``(atac, rna)`` of each category of the registered modality flag."""
        if MODALITY_FLAG_KEY not in self.adata_manager.data_registry:
            return None
        state = self.adata_manager.get_state_registry(MODALITY_FLAG_KEY)
        return [MODALITY_FLAG_VALUES[str(c)] for c in state.categorical_mapping]

    def _n_features(self) -> dict[str, int]:
        """Number of features of each registered modality."""
        registered = self._registered_modalities()
        stats = self.summary_stats
        if registered == (ATAC, RNA):
            return {ATAC: stats["n_atac"], RNA: stats["n_vars"]}
        return {registered[0]: stats["n_vars"]}


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
    validate_covariate_values(obs, key, argument, where)
