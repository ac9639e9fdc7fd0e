"""Flush subnormal floating-point numbers to zero for the duration of training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def flush_denormal_enabled() -> bool:
    """Whether the CPU currently flushes subnormal numbers to zero (torch has no getter)."""
    tiny = torch.finfo(torch.float32).tiny
    probe = torch.full((1,), tiny, dtype=torch.float32) * 0.5  # subnormal unless flushed
    return bool(probe[0] == 0)


@contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[None]:
    """``torch.set_flush_denormal(enabled)`` inside the block, the previous setting after.

    Adam's moment estimates of a weight whose gradient stays zero (the first-layer weights
    of peaks absent from recent minibatches) shrink by ``beta1`` at every step and, after
    several hundred steps, reach the subnormal range, where CPU arithmetic is many times
    slower; flushed to zero, they cost what normal numbers cost and change no update by
    more than ``lr * 1e-38 / eps``. The setting is the thread's floating-point mode, so it
    is restored when the block ends, also on an error. Where the CPU does not support it
    (``set_flush_denormal`` returns ``False``), nothing changes.
    """
    previous = flush_denormal_enabled()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)
