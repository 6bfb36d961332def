"""Synthetic fitnesses with a known optimum for the AutoDiffusion search tests (no model: pure arithmetic)."""

from __future__ import annotations

from collections.abc import Callable


def distance_to(target: tuple[int, ...]) -> tuple[Callable[[tuple[int, ...]], float], list[tuple[int, ...]]]:
    """(a fitness: the L1 distance of a candidate to ``target``, the list of the candidates it was called with)."""
    calls: list[tuple[int, ...]] = []

    def fitness(candidate: tuple[int, ...]) -> float:
        calls.append(candidate)
        return float(sum(abs(a - b) for a, b in zip(candidate, target, strict=True)))

    return fitness, calls
