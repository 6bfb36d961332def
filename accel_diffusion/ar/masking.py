"""MAR's cosine masking schedule: how many tokens AR iteration k of K generates.

After iteration k, ``floor(N cos(pi/2 (k+1)/K))`` of the N tokens stay masked, clamped (as MAR does)
so that every iteration generates at least one token and at least one stays masked until the last
iteration, which generates all that remain. Early iterations generate few tokens, late ones many.
"""

from __future__ import annotations

import math


def tokens_per_iteration(num_tokens: int, num_iterations: int) -> list[int]:
    """Tokens generated at each AR iteration; they sum to ``num_tokens``."""
    if not 1 <= num_iterations <= num_tokens:
        raise ValueError(f"num_iterations must be in 1 .. {num_tokens}, got {num_iterations}")
    masked = num_tokens
    counts = []
    for k in range(num_iterations):
        if k == num_iterations - 1:
            left = 0
        else:
            left = max(1, min(masked - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iterations))))
        counts.append(masked - left)
        masked = left
    return counts


def head_cost(num_tokens: int, plan: list[int]) -> tuple[int, int]:
    """(sum of tokens x head steps, sum of head steps) for a per-iteration step ``plan``: the head's work
    and its sequential calls per image and branch (specs/samplers.md §5.4)."""
    counts = tokens_per_iteration(num_tokens, len(plan))
    return sum(c * s for c, s in zip(counts, plan, strict=True)), sum(plan)
