"""Models."""

from ._scale import SCALE

__all__ = ["SCALE"]
