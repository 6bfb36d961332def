"""CPU settings for training and measuring the shapes models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero while inside (late in CPU training they slow steps >10x).

    The flag is process-wide CPU state, so it is cleared again on exit: left on, it changes other
    code's arithmetic (hypothesis, for one, refuses to generate floats). Usable as a decorator.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
