"""Evaluation mode for a pass over cells made from inside the training loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in evaluation mode (batch norm on its running statistics, no dropout)
    inside the block, back in the mode it was in afterwards, also on error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
