"""scale_scvi: SCALE (a Gaussian-mixture-prior VAE for scATAC-seq) on scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from . import data, datasets, pl, pp

try:
    __version__ = version("scale-scvi")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = ["SCALE", "data", "datasets", "pl", "pp", "__version__"]


def __getattr__(name: str):
    # SCALE (and with it torch) is imported on first use, so that the command-line tool
    # can set THP_MEM_ALLOC_ENABLE before torch starts (torch reads it once).
    if name == "SCALE":
        from .model import SCALE

        return SCALE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
