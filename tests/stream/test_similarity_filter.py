"""Stochastic similarity filter: the skip probability formula, static vs moving input, the skip cap."""

from __future__ import annotations

import math

import torch

from accel_diffusion.stream import SimilarityFilter


def test_skip_probability_follows_the_formula() -> None:
    reference = torch.tensor([1.0, 0.0])
    filt = SimilarityFilter(threshold=0.9)
    assert filt.skip_probability(reference) == 0.0  # no reference yet
    filt.should_skip(reference)
    for angle in (0.0, 0.2, 0.3, 0.45, 1.0):
        frame = torch.tensor([math.cos(angle), math.sin(angle)])
        expected = max(0.0, (math.cos(angle) - 0.9) / (1 - 0.9))
        assert abs(filt.skip_probability(frame) - expected) < 1e-6  # float32 frames


def test_empirical_skip_rate_matches_the_probability() -> None:
    filt = SimilarityFilter(threshold=0.9, max_skip=10**9, seed=1)
    reference = torch.tensor([1.0, 0.0])
    filt.should_skip(reference)
    frame = torch.tensor([math.cos(0.3), math.sin(0.3)])  # P(skip) = (cos 0.3 - 0.9) / 0.1 = 0.5534
    probability = filt.skip_probability(frame)
    skips = sum(filt.should_skip(frame) for _ in range(4000))
    # every processed frame becomes the reference (similarity 1 afterwards): count only first decisions
    filt = SimilarityFilter(threshold=0.9, max_skip=10**9, seed=2)
    decisions = []
    for _ in range(4000):
        filt.reset()
        filt.should_skip(reference)
        decisions.append(filt.should_skip(frame))
    assert skips > 0 and abs(sum(decisions) / 4000 - probability) < 0.025  # 3 sd of a binomial


def test_static_input_skips_at_least_90_percent_and_moving_input_none() -> None:
    generator = torch.Generator().manual_seed(0)
    still = torch.rand(3, 32, 32, generator=generator) * 2 - 1
    filt = SimilarityFilter(threshold=0.98, max_skip=10)
    static = sum(filt.should_skip(still) for _ in range(1100))
    assert static / 1100 >= 0.9  # capped at 10 skips in a row: 1000 of 1100
    filt = SimilarityFilter(threshold=0.98, max_skip=10)
    moving = sum(filt.should_skip(torch.rand(3, 32, 32, generator=generator) * 2 - 1) for _ in range(200))
    assert moving == 0


def test_never_more_than_max_skip_in_a_row() -> None:
    filt = SimilarityFilter(threshold=0.5, max_skip=3)
    frame = torch.ones(8)
    decisions = [filt.should_skip(frame) for _ in range(12)]
    assert decisions == [False, True, True, True] * 3
