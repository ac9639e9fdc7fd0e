"""Telling the user, before and during training, how long it will take."""

from __future__ import annotations

import time
from collections.abc import Callable

from lightning.pytorch.callbacks import Callback

# Seconds per optimizer step and per input feature (peak or gene), on the CPU, with the
# default encoder (256 first-layer units per feature, whose weights dominate a step): 35 ms
# per step of 32 cells on 50,000 peaks (benchmarks/RESULTS.md, Scale: 10,000 cells, 313
# steps in 10.9 s), 25 ms at 50,000 cells, two threads. (With the original's 1,024 units it
# was 63 ms, and 1.5e-6 s per feature and step.)
SECONDS_PER_FEATURE_STEP = 7e-7
LONG_RUN_S = 300.0  # runs estimated longer than this are announced
SHORTEN = (
    "fewer epochs (--max-epochs), fewer peaks (--n-top-peaks) or a GPU (--accelerator gpu) "
    "shorten it"
)


def duration(seconds: float) -> str:
    """``seconds`` in words: '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunTimeNotice(Callback):
    """Announce a long training run: estimated at its start, measured after one epoch.

    Parameters
    ----------
    n_features
        Peaks (plus genes) the model reads.
    log
        Where the messages go.
    """

    def __init__(self, n_features: int, log: Callable[[str], None]):
        self.n_features = n_features
        self.say = log
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        steps = trainer.num_training_batches * trainer.max_epochs
        estimate = steps * self.n_features * SECONDS_PER_FEATURE_STEP
        if pl_module.device.type == "cpu" and estimate > LONG_RUN_S:
            self.say(
                f"This is a long run: {trainer.max_epochs} epochs of "
                f"{trainer.num_training_batches} steps on {self.n_features:,} features, "
                f"about {duration(estimate)} on an idle 2-core CPU; {SHORTEN}."
            )
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch != 0 or trainer.max_epochs < 2:
            return
        epoch = time.perf_counter() - self._start
        remaining = epoch * (trainer.max_epochs - 1)
        if remaining > LONG_RUN_S:
            self.say(
                f"The first epoch took {duration(epoch)}: about {duration(remaining)} to go "
                f"for the other {trainer.max_epochs - 1}; {SHORTEN}."
            )
