"""Stop training with a clear error when the loss stops being a finite number."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Stop training with :class:`NonFiniteLossError` as soon as the loss is not finite.

    The loss of every training step is checked before its backward pass, so that the
    parameters are never updated with NaN or infinite gradients. Under a distributed
    strategy the ranks agree on the decision, so that all of them stop together instead of
    waiting for each other.

    The error names the epoch and step, and suggests a lower learning rate: a non-finite
    loss in SCALE almost always follows a learning rate too large for the data. If training
    fails elsewhere because the model diverged (non-finite parameters, or a distribution
    that rejects the NaN it is given), the same advice is attached to that error as a note.
    """

    @staticmethod
    def _advice(trainer) -> str:
        lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None
        current = f" (now {lr:g})" if lr is not None else ""
        suggestion = f"e.g. model.train(lr={lr / 10:g})" if lr is not None else "e.g. by 10x"
        return (
            f"Lower the learning rate{current}, {suggestion}; if it persists, check the input "
            "for extreme values and keep gradient clipping on (gradient_clip_val)."
        )

    @staticmethod
    def _where(trainer) -> str:
        return f"at epoch {trainer.current_epoch} (step {trainer.global_step})"

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        value = loss.detach().float().mean().item() if not finite else None
        what = f"non-finite ({value})" if value is not None else "non-finite on another process"
        raise NonFiniteLossError(
            f"The training loss became {what} {self._where(trainer)}. {self._advice(trainer)}"
        )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError) or not hasattr(exception, "add_note"):
            return
        params = [p for p in pl_module.parameters() if p.numel()]
        if all(bool(torch.isfinite(p.detach()).all()) for p in params):
            # Finite but huge parameters overflow in the forward pass instead; a
            # distribution then rejects the NaN it is given.
            if not (isinstance(exception, ValueError) and "invalid values" in str(exception)):
                return
            what = "produced NaN or infinite values"
        else:
            what = "became non-finite"
        exception.add_note(
            f"The model {what} {self._where(trainer)}: training diverged. {self._advice(trainer)}"
        )
