"""Median wall time of a call, for the timings the model cards and benchmarks report."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[[], Any], repeats: int = 100, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones (kernels,
    allocator and CPU clocks settle first)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(samples)
