"""scale_scvi: SCALE (a Gaussian-mixture-prior VAE for scATAC-seq) on scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from . import data, pl, pp
from .model import SCALE

try:
    __version__ = version("scale-scvi")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = ["SCALE", "data", "pl", "pp", "__version__"]
