"""Training utilities."""

from ._finite_guard import FiniteLossGuard, NonFiniteLossError
from ._gmm_init import GMMInitCallback, fit_gmm
from ._optim import FusedAdamW

__all__ = ["FiniteLossGuard", "FusedAdamW", "GMMInitCallback", "NonFiniteLossError", "fit_gmm"]
