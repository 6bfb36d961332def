"""The quality–latency Pareto front: which measured points no other point beats on both axes.

A point is (latency, quality), lower latency and higher quality better. Measurements are noisy, so
dominance has margins: ``a`` dominates ``b`` only when ``a`` is at least as fast and at least as good
*and* clearly better on one axis — faster by more than ``latency_margin`` (relative) or better by more
than ``quality_margin`` (absolute). Two points within the noise of each other on both axes both stay
on the front (a tie is not a defeat), so a re-measurement cannot flip which of them survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Margins:
    """What counts as a real difference: ``latency`` relative (0.05 = 5 %), ``quality`` absolute."""

    latency: float = 0.05
    quality: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.latency < 1.0) or self.quality < 0.0:
            raise ValueError(f"margins must be latency in [0, 1) and quality >= 0, got {self}")


def dominates(a: tuple[float, float], b: tuple[float, float], margins: Margins = Margins()) -> bool:
    """Whether point ``a`` = (latency, quality) dominates ``b`` beyond the noise ``margins``."""
    (la, qa), (lb, qb) = a, b
    if la > lb or qa < qb:
        return False
    return la < lb * (1.0 - margins.latency) or qa > qb + margins.quality


def pareto_front(points: Sequence[tuple[float, float]], margins: Margins = Margins()) -> list[int]:
    """Indices of the points no other point dominates, fastest first (ties: better quality first, then index).

    Exact duplicates are kept once (the first index): they are the same measurement twice."""
    seen: set[tuple[float, float]] = set()
    front = []
    for i, p in enumerate(points):
        if p in seen:
            continue
        seen.add(p)
        if not any(dominates(q, p, margins) for j, q in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def best_within(points: Sequence[tuple[float, float]], candidates: Sequence[int], latency_budget: float,
                min_quality: float | None = None) -> int | None:
    """The best-quality point among ``candidates`` whose latency fits ``latency_budget`` (and whose quality
    reaches ``min_quality``); equal quality goes to the faster one. None when nothing fits."""
    fitting = [i for i in candidates if points[i][0] <= latency_budget
               and (min_quality is None or points[i][1] >= min_quality)]
    if not fitting:
        return None
    return max(fitting, key=lambda i: (points[i][1], -points[i][0], -i))
