"""Modules: the math of SCALE."""

from ._components import SCALEDecoder, SCALEEncoder
from ._multivae import MultiSCALEVAE
from ._prior import GaussianMixturePrior
from ._scalevae import SCALEVAE

__all__ = ["SCALEVAE", "MultiSCALEVAE", "GaussianMixturePrior", "SCALEEncoder", "SCALEDecoder"]
