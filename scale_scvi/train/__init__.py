"""Training utilities."""

from ._gmm_init import GMMInitCallback, fit_gmm

__all__ = ["GMMInitCallback", "fit_gmm"]
