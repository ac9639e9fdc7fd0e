"""Helpers shared by the plotting functions."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

_NON_INTERACTIVE = ("agg", "pdf", "svg", "ps", "cairo", "template")


def finish(fig: Figure, show: bool | None, save: str | None) -> bool:
    """Save and/or show a figure as :mod:`scanpy.pl` does; return whether it was shown.

    ``show=None`` shows the figure when the matplotlib backend is interactive (a notebook or
    a window), and not under a file-only backend such as ``Agg``.
    """
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show is None:
        show = plt.get_backend().lower() not in _NON_INTERACTIVE
    if show:
        plt.show()
    return show
