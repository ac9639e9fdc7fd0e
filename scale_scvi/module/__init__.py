"""Modules: the math of SCALE."""

from . import _constants
from ._base import SCALEModuleBase
from ._components import SCALEDecoder, SCALEEncoder, SparseFirstLayer
from ._constants import *  # noqa: F403  (modalities and keys: _constants.__all__)
from ._lsi import LSIProjection
from ._multivae import MultiSCALEVAE
from ._prior import GaussianMixturePrior
from ._scalevae import SCALEVAE


def module_class(modalities: tuple[str, ...]) -> type[SCALEModuleBase]:
    """The module for the registered modalities: :class:`SCALEVAE` for ATAC alone, else
    :class:`MultiSCALEVAE` (RNA, or RNA and ATAC)."""
    return SCALEVAE if tuple(modalities) == (_constants.ATAC,) else MultiSCALEVAE


__all__ = [
    *_constants.__all__,
    "GaussianMixturePrior",
    "LSIProjection",
    "MultiSCALEVAE",
    "SCALEDecoder",
    "SCALEEncoder",
    "SCALEModuleBase",
    "SCALEVAE",
    "SparseFirstLayer",
    "module_class",
]
