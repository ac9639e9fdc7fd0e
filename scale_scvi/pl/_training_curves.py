"""Training curves from a trained model's history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from ._utils import finish

_METRICS = ("elbo", "reconstruction_loss", "kl_local")
_TITLES = {
    "elbo": "negative ELBO",
    "reconstruction_loss": "reconstruction loss",
    "kl_local": "KL divergence",
}


def _history(model_or_history) -> Mapping[str, pd.DataFrame]:
    history = getattr(model_or_history, "history", model_or_history)
    if not isinstance(history, Mapping):
        raise TypeError(
            "training_curves takes a trained model or its `history` dict, got "
            f"{type(model_or_history).__name__}."
        )
    if not history:
        raise ValueError("The history is empty: train the model first (model.train()).")
    return history


def training_curves(
    model_or_history,
    metrics: Sequence[str] = _METRICS,
    axes: Sequence[Axes] | None = None,
    logy: bool = False,
    show: bool | None = None,
    save: str | None = None,
) -> np.ndarray | None:
    """Plot the training (and validation) curves of a trained model, one panel per metric.

    Parameters
    ----------
    model_or_history
        A trained :class:`~scale_scvi.SCALE` (or any scvi-tools model), or its ``history``
        dict of per-epoch :class:`pandas.DataFrame` s.
    metrics
        Metric names without the ``_train``/``_validation`` suffix; each gets a panel with its
        training curve and, when the model was validated, its validation curve. Metrics missing
        from the history are an error.
    axes
        Axes to draw on, one per metric; new ones by default.
    logy
        Logarithmic y axis.
    show
        Show the figure (default: when the matplotlib backend is interactive).
    save
        Save the figure to this path.

    Returns
    -------
    The array of axes, unless the figure was shown.

    Examples
    --------
    >>> model.train()
    >>> scale_scvi.pl.training_curves(model)
    """
    history = _history(model_or_history)
    metrics = list(metrics)
    missing = [m for m in metrics if f"{m}_train" not in history]
    if missing:
        available = sorted({k.rsplit("_", 1)[0] for k in history if k.endswith("_train")})
        raise ValueError(f"Metrics {missing} are not in the history (available: {available}).")
    if axes is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
        axes = axes[0]
    else:
        axes = np.atleast_1d(np.asarray(axes, dtype=object))
        if len(axes) != len(metrics):
            raise ValueError(f"Got {len(axes)} axes for {len(metrics)} metrics.")
        fig = axes[0].figure
    for ax, metric in zip(axes, metrics, strict=True):
        for split, style in (("train", "-"), ("validation", "--")):
            key = f"{metric}_{split}"
            if key in history:
                curve = history[key].iloc[:, 0].astype(float)
                ax.plot(curve.index.to_numpy(), curve.to_numpy(), style, label=split)
        ax.set_title(_TITLES.get(metric, metric))
        ax.set_xlabel("epoch")
        if logy:
            ax.set_yscale("log")
        ax.legend(frameon=False)
    fig.tight_layout()
    if finish(fig, show, save):
        return None
    return np.asarray(axes)
