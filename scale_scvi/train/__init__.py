"""Training utilities."""

from ._datasplitter import SparseDataSplitter
from ._finite_guard import FiniteLossGuard, NonFiniteLossError
from ._gmm_init import GMMInitCallback, fit_gmm
from ._optim import FusedAdamW

__all__ = [
    "FiniteLossGuard",
    "FusedAdamW",
    "GMMInitCallback",
    "NonFiniteLossError",
    "SparseDataSplitter",
    "fit_gmm",
]
