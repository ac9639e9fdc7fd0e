"""Names shared by the modules and the model: output keys, registry keys, modalities.

Every key a module puts in (or reads from) its inference and generative outputs is defined
here, once. The generic keys have the string values of scvi-tools' own module keys, so
scvi-tools' mixins (``get_latent_representation``, ``get_elbo``, ...) read SCALE's outputs.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from scvi import REGISTRY_KEYS

#: The names :mod:`scale_scvi.module` exports (``expert_keys`` is the modules' own).
__all__ = [
    "ATAC",
    "ATAC_KEY",
    "JOINT",
    "MODALITIES",
    "MODALITY_FLAG_KEY",
    "MODULE_KEYS",
    "Modality",
    "RNA",
    "RNA_KEY",
]

#: The modalities a module can model, in the order of the multimodal module's experts.
ATAC = "atac"
RNA = "rna"
MODALITIES = (ATAC, RNA)
#: The posterior over all the modalities a cell has.
JOINT = "joint"
Modality = Literal["joint", "atac", "rna"]

#: Registry key of the per-cell modality flag (a categorical ``obs`` column).
MODALITY_FLAG_KEY = "modality_flag"
#: Registry keys of the multimodal data: RNA in ``X`` and ATAC beside it, as in MultiVI.
RNA_KEY = REGISTRY_KEYS.X_KEY
ATAC_KEY = REGISTRY_KEYS.ATAC_X_KEY


class _MODULE_KEYS(NamedTuple):
    # scvi-tools' keys (same values as scvi.module's, which its mixins read)
    X_KEY: str = "x"
    Z_KEY: str = "z"
    QZ_KEY: str = "qz"
    QZM_KEY: str = "qzm"
    QZV_KEY: str = "qzv"
    LIBRARY_KEY: str = "library"
    BATCH_INDEX_KEY: str = "batch_index"
    CONT_COVS_KEY: str = "cont_covs"
    CAT_COVS_KEY: str = "cat_covs"
    PX_KEY: str = "px"
    # SCALE's own
    X_BINARIZED_KEY: str = "x_binarized"
    X_ATAC_KEY: str = "x_atac"
    X_RNA_KEY: str = "x_rna"
    MODALITY_FLAG_KEY: str = "modality_flag"
    MODALITY_MASK_KEY: str = "modality_mask"
    EXPERT_MASK_KEY: str = "expert_mask"
    QZM_EXPERTS_KEY: str = "qzm_experts"
    QZV_EXPERTS_KEY: str = "qzv_experts"
    QZM_COMPONENTS_KEY: str = "qzm_components"
    QZV_COMPONENTS_KEY: str = "qzv_components"
    COMPONENT_MASK_KEY: str = "component_mask"
    COMPONENT_LOG_WEIGHTS_KEY: str = "component_log_weights"
    PX_RNA_KEY: str = "px_rna"
    PX_RNA_SCALE_KEY: str = "px_rna_scale"


MODULE_KEYS = _MODULE_KEYS()


def expert_keys(modality: str) -> tuple[str, str]:
    """Keys of the mean and variance of one modality's expert ``q(z|x_m)``."""
    return f"qzm_{modality}", f"qzv_{modality}"
