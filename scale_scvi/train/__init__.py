"""Training utilities."""

from ._finite_guard import FiniteLossGuard, NonFiniteLossError
from ._gmm_init import GMMInitCallback, fit_gmm

__all__ = ["FiniteLossGuard", "GMMInitCallback", "NonFiniteLossError", "fit_gmm"]
