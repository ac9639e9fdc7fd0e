"""Training utilities."""

from ._datasplitter import SparseDataSplitter
from ._denormal import flush_denormal
from ._expert_check import ExpertCheckCallback
from ._finite_guard import FiniteLossGuard, NonFiniteLossError
from ._gmm_init import REFIT_RESOLUTION, REFIT_TRIM, GMMInitCallback, fit_gmm
from ._interrupt import InterruptRecorder
from ._optim import FusedAdamW, InPlaceGradient
from ._plan import EpochMetricsTrainingPlan

__all__ = [
    "REFIT_RESOLUTION",
    "REFIT_TRIM",
    "EpochMetricsTrainingPlan",
    "ExpertCheckCallback",
    "FiniteLossGuard",
    "FusedAdamW",
    "GMMInitCallback",
    "InPlaceGradient",
    "InterruptRecorder",
    "NonFiniteLossError",
    "SparseDataSplitter",
    "fit_gmm",
    "flush_denormal",
]
