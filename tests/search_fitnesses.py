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


class Interrupt(Exception):
    """An interruption in the middle of a search (raised by ``interrupted_at``'s fitness)."""


def interrupted_at(target: tuple[int, ...], calls: list[tuple[int, ...]],
                   limit: int) -> Callable[[tuple[int, ...]], float]:
    """The distance to ``target``, appending every candidate it scores to ``calls``, that raises ``Interrupt``
    instead once ``calls`` holds ``limit`` candidates (``calls`` shared by the runs of one resumed search)."""

    def fitness(candidate: tuple[int, ...]) -> float:
        if len(calls) == limit:
            raise Interrupt
        calls.append(candidate)
        return float(sum(abs(a - b) for a, b in zip(candidate, target, strict=True)))

    return fitness
