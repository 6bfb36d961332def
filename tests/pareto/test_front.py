"""Dominance with noise margins, the front, and the choice under a budget."""

from __future__ import annotations

import random

import pytest

from accel_diffusion.pareto.front import Margins, best_within, dominates, pareto_front


def test_dominance_needs_a_real_difference_on_one_axis() -> None:
    exact = Margins(latency=0.0, quality=0.0)
    assert dominates((10, 0.9), (20, 0.8), exact)
    assert not dominates((10, 0.9), (10, 0.9), exact)  # equal: neither
    assert dominates((10, 0.9), (10, 0.8), exact) and dominates((10, 0.9), (11, 0.9), exact)
    noisy = Margins(latency=0.05, quality=0.02)
    assert not dominates((10, 0.9), (10.4, 0.9), noisy)  # 4 % faster, same quality: noise
    assert dominates((10, 0.9), (10.6, 0.9), noisy)  # 6 % faster: real
    assert not dominates((10, 0.91), (10, 0.90), noisy)  # 0.01 better: noise
    assert dominates((10, 0.93), (10, 0.90), noisy)
    assert not dominates((10, 0.89), (20, 0.90), noisy)  # faster but worse: a trade-off, not a defeat


def test_front_keeps_trade_offs_and_ties_and_drops_the_dominated_fastest_first() -> None:
    points = [(50, 0.99), (10, 0.5), (20, 0.8), (25, 0.7), (10, 0.5), (20.5, 0.8), (60, 0.99)]
    front = pareto_front(points, Margins(latency=0.05, quality=0.0))
    # (25, 0.7) is beaten by (20, 0.8); (60, 0.99) by (50, 0.99); the duplicate (10, 0.5) kept once;
    # (20.5, 0.8) is within 5 % of (20, 0.8): a tie, kept
    assert front == [1, 2, 5, 0]


def test_front_is_exactly_the_undominated_set_on_random_points() -> None:
    rng = random.Random(3)
    for _ in range(200):
        points = [(rng.choice([5, 10, 20, 40]) * rng.uniform(0.9, 1.1), round(rng.random(), 1)) for _ in range(12)]
        margins = Margins(latency=rng.choice([0.0, 0.05]), quality=rng.choice([0.0, 0.1]))
        front = set(pareto_front(points, margins))
        for i, p in enumerate(points):
            undominated = not any(dominates(q, p, margins) for j, q in enumerate(points) if j != i)
            first_copy = points.index(p) == i
            assert (i in front) == (undominated and first_copy)


def test_best_within_budget_takes_the_best_quality_and_the_faster_of_equals() -> None:
    points = [(10, 0.5), (20, 0.8), (30, 0.8), (50, 0.99)]
    front = [0, 1, 2, 3]
    assert best_within(points, front, 5) is None
    assert best_within(points, front, 10) == 0
    assert best_within(points, front, 35) == 1  # 0.8 at 20 ms rather than 0.8 at 30 ms
    assert best_within(points, front, 1000) == 3
    assert best_within(points, front, 1000, min_quality=0.995) is None
    assert best_within(points, front, 25, min_quality=0.6) == 1


@pytest.mark.parametrize("bad", [{"latency": -0.1}, {"latency": 1.0}, {"quality": -1}])
def test_margins_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError, match="margins"):
        Margins(**bad)
