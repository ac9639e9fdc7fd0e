"""Modules: the math of SCALE."""

from ._components import SCALEDecoder, SCALEEncoder
from ._prior import GaussianMixturePrior
from ._scalevae import SCALEVAE

__all__ = ["SCALEVAE", "GaussianMixturePrior", "SCALEEncoder", "SCALEDecoder"]
