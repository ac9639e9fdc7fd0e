"""Modules: the math of SCALE."""

from ._base import SCALEModuleBase
from ._components import SCALEDecoder, SCALEEncoder, SparseFirstLayer
from ._constants import (
    ATAC,
    ATAC_KEY,
    JOINT,
    MODALITIES,
    MODALITY_FLAG_KEY,
    MODULE_KEYS,
    RNA,
    RNA_KEY,
    Modality,
)
from ._multivae import MultiSCALEVAE
from ._prior import GaussianMixturePrior
from ._scalevae import SCALEVAE


def module_class(modalities: tuple[str, ...]) -> type[SCALEModuleBase]:
    """The module for the registered modalities: :class:`SCALEVAE` for ATAC alone, else
    :class:`MultiSCALEVAE` (RNA, or RNA and ATAC)."""
    return SCALEVAE if tuple(modalities) == (ATAC,) else MultiSCALEVAE


__all__ = [
    "ATAC",
    "ATAC_KEY",
    "GaussianMixturePrior",
    "JOINT",
    "MODALITIES",
    "MODALITY_FLAG_KEY",
    "MODULE_KEYS",
    "Modality",
    "MultiSCALEVAE",
    "RNA",
    "RNA_KEY",
    "SCALEDecoder",
    "SCALEEncoder",
    "SCALEModuleBase",
    "SCALEVAE",
    "SparseFirstLayer",
    "module_class",
]
