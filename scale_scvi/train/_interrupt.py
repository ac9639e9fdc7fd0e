"""Keep what was trained when training is interrupted (Ctrl-C, or a signal raised as an error)."""

from __future__ import annotations

import signal
import warnings

from lightning.pytorch.callbacks import Callback
from scvi import settings


class InterruptRecorder(Callback):
    """Record an interrupt of training, so that the model can keep what was trained.

    Lightning turns a :class:`KeyboardInterrupt` in ``fit`` into ``SystemExit(1)`` after
    tearing the trainer down (and re-raises other exceptions that are not an
    :class:`Exception`, such as a signal turned into one); the hook it calls first,
    ``on_exception``, sees the original. :meth:`interrupt_of` gives it back from what
    reached the caller, and :meth:`finish` leaves the model usable. Lightning also ignores
    SIGINT from then on (against repeated Ctrl-C during its shutdown); :meth:`finish` puts
    back the handler there was when the recorder was made, so that Ctrl-C works again.
    """

    def __init__(self):
        super().__init__()
        self.exception: BaseException | None = None
        self.epochs_done = 0
        self.steps_done = 0
        self.max_epochs: int | None = None
        self._datamodule = None
        self._trainer = None
        self._sigint_handler = signal.getsignal(signal.SIGINT)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Exception):
            return
        self.exception = exception
        self.epochs_done = trainer.current_epoch
        self.steps_done = trainer.global_step
        self.max_epochs = trainer.max_epochs
        self._datamodule = trainer.datamodule
        self._trainer = trainer

    def interrupt_of(self, error: BaseException) -> BaseException | None:
        """The interrupt behind ``error`` (Lightning's ``SystemExit`` included), or ``None``."""
        if self.exception is None:
            return None
        if error is self.exception or isinstance(error, SystemExit):
            return self.exception
        return None

    def finish(self, model) -> None:
        """Leave ``model`` in eval mode with what was trained so far, and warn saying so."""
        model.module.eval()
        if self._sigint_handler is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            try:
                signal.signal(signal.SIGINT, self._sigint_handler)
            except ValueError:  # not the main thread, where Lightning could not change it either
                pass
        if self.steps_done > 0:
            model.is_trained_ = True
            model.trainer = self._trainer
            for name, attr in (("train", "train_idx"), ("validation", "val_idx")):
                setattr(model, f"{name}_indices", getattr(self._datamodule, attr, None))
            model.test_indices = getattr(self._datamodule, "test_idx", None)
        of = f" of {self.max_epochs}" if self.max_epochs is not None else ""
        kept = (
            "the model holds what was trained so far, in eval mode (train() trains it further)"
            if self.steps_done > 0
            else "no update was made, the model is as it was"
        )
        cause = str(self.exception) or type(self.exception).__name__
        warnings.warn(
            f"Training was interrupted ({cause}) during epoch "
            f"{self.epochs_done + 1}{of}, after {self.epochs_done} complete epoch"
            f"{'' if self.epochs_done == 1 else 's'} ({self.steps_done} steps): {kept}.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )
