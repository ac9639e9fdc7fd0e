"""Progress to stderr, and no third-party warnings that SCALE's own choices cause."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from scvi.train._progress import ProgressBar
from tqdm.auto import tqdm


class StderrProgressBar(ProgressBar):
    """scvi-tools' per-epoch progress bar, written to ``stderr`` (scvi-tools writes it to
    ``stdout``), so that ``> log`` captures a script's results and not the bar's updates."""

    def init_train_tqdm(self, trainer):
        """The training bar: one step per epoch, on ``stderr``."""
        return tqdm(
            total=trainer.max_epochs, desc="Training", file=sys.stderr, disable=self.is_disabled
        )


@contextmanager
def sparse_minibatch_warnings_handled() -> Iterator[None]:
    """Training with CSR minibatches without torch's two warnings about them.

    ``load_sparse_tensor=True`` (SCALE's default on the CPU) makes scvi-tools' data loader
    build CSR tensors, on which torch warns once per process that "Sparse CSR tensor support
    is in beta" (SCALE's modules are tested on CSR; nothing for a user to act on): that one
    message is ignored here, for this block only. Torch's second warning asks for an
    explicit choice about invariant checks: the block makes it, keeping torch's default
    (no checks; the tensors come from valid scipy CSR matrices).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            yield


@contextmanager
def small_last_batch_warning_ignored(ignore: bool) -> Iterator[None]:
    """Without scvi-tools' "Last batch will have a small size" warning, when ``ignore``.

    scvi-tools warns whenever the training cells leave one or two over after the full
    minibatches, "to avoid errors during model training": the errors are those of batch
    normalization on a minibatch of one cell. A model without batch normalization (SCALE's
    default encoder has layer norm) trains on such a minibatch like on any other, so the
    warning asks the user to act on nothing; the model passes ``ignore=True`` then.
    """
    with warnings.catch_warnings():
        if ignore:
            warnings.filterwarnings(
                "ignore", message="Last batch will have a small size", category=UserWarning
            )
        yield


class _DropAlreadyDownloaded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("already downloaded")


@contextmanager
def no_download_message() -> Iterator[None]:
    """Without scvi-tools' "File ... already downloaded" log line, which its ``load``
    writes for every local model file (nothing is downloaded)."""
    logger = logging.getLogger("scvi.data._download")
    log_filter = _DropAlreadyDownloaded()
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)
