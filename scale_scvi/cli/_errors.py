"""The CLI's one-line errors, worded with its option names."""

from __future__ import annotations

import re


class CLIError(Exception):
    """An error to report to the user in one line, without a traceback."""


# Library argument names and the options that set them, so that a library error names the
# option the user typed.
_OPTIONS = {
    "n_centroids": "--n-centroids",
    "n_latent": "--n-latent",
    "max_epochs": "--max-epochs",
    "batch_size": "--batch-size",
    "batch_key": "--batch-key",
    "min_peaks": "--min-peaks",
    "min_cells": "--min-cells",
    "n_top": "--n-top-peaks",
}


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type's name if it has none)."""
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


def from_library(err: Exception) -> CLIError:
    """A library ``ValueError`` / ``TypeError`` as a CLI error naming the options."""
    text = one_line(err)
    for name, option in _OPTIONS.items():
        text = re.sub(rf"(?<![\w.-]){name}\b", option, text)
    return CLIError(text)
