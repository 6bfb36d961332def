"""DiSA step annealing (schedules/disa.py): the spec's schedule properties (§5.7 test 1), the guard
tests (§5.7 test 4), the cost table of §5.4 to the token, and the request form validated at the edge."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accel_diffusion.ar.masking import head_cost, tokens_per_iteration
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.disa import DisaSchedule, StepAnnealer
from accel_diffusion.strategy import Strategy

KINDS = ("linear", "cosine", "two_stage", "constant")


@st.composite
def annealers(draw: st.DrawFn) -> tuple[StepAnnealer, int]:
    lower = draw(st.integers(1, 200))
    upper = draw(st.integers(lower, 300))
    return StepAnnealer(upper, lower, draw(st.sampled_from(KINDS))), draw(st.integers(1, 300))


@settings(max_examples=300, deadline=None)
@given(annealers())
def test_integers_in_range_and_non_increasing(case: tuple[StepAnnealer, int]) -> None:
    annealer, iterations = case
    plan = annealer.plan(iterations)
    assert all(type(s) is int and annealer.lower <= s <= annealer.upper for s in plan)
    assert all(a >= b for a, b in pairwise(plan))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(0, 100), st.integers(2, 300))
def test_endpoints_and_switch(lower: int, extra: int, iterations: int) -> None:
    upper = lower + extra
    for kind in ("linear", "cosine"):
        plan = StepAnnealer(upper, lower, kind).plan(iterations)
        assert plan[0] == upper and plan[-1] == lower
    last = iterations - 1
    two = StepAnnealer(upper, lower, "two_stage").plan(iterations)
    switch = -(-last // 2)  # ceil(U / 2): the first iteration at the lower count
    assert two == [upper] * switch + [lower] * (iterations - switch)
    assert StepAnnealer(upper, lower, "constant").plan(iterations) == [lower] * iterations


def test_linear_and_cosine_values() -> None:
    """Hand values: linear 50->5 over 10 iterations is 5 + floor((9-k)/9 * 45) = 5 + 5 (9-k)."""
    assert StepAnnealer(50, 5, "linear").plan(10) == [50, 45, 40, 35, 30, 25, 20, 15, 10, 5]
    # cosine over K = 5 (U = 4): (cos(pi k/4) + 1)/2 * 45 = 45, 38.41, 22.5, 6.59, 0
    assert StepAnnealer(50, 5, "cosine").plan(5) == [50, 43, 27, 11, 5]
    assert StepAnnealer(50, 5, "two_stage").plan(5) == [50, 50, 5, 5, 5]


@pytest.mark.parametrize("kind", KINDS)
def test_equal_upper_and_lower_is_constant(kind: str) -> None:
    assert StepAnnealer(17, 17, kind).plan(33) == [17] * 33


@pytest.mark.parametrize(("kind", "expected"), [("linear", 50), ("cosine", 50), ("two_stage", 50), ("constant", 5)])
def test_one_ar_iteration(kind: str, expected: int) -> None:
    """K = 1 (U = 0, the formulas divide by zero): the only iteration gets upper (constant: lower)."""
    assert StepAnnealer(50, 5, kind).plan(1) == [expected]


@pytest.mark.parametrize(
    ("upper", "kind", "tokens_x_steps", "sequential"),
    [(50, "linear", 5372, 1733), (50, "cosine", 5015, 1729), (50, "two_stage", 4655, 1760), (25, "linear", 3019, 929)],
)
def test_spec_cost_table(upper: int, kind: str, tokens_x_steps: int, sequential: int) -> None:
    """specs/samplers.md §5.4: 256 tokens, 64 AR iterations of MAR's cosine masking."""
    assert sum(tokens_per_iteration(256, 64)) == 256
    assert head_cost(256, StepAnnealer(upper, 5, kind).plan(64)) == (tokens_x_steps, sequential)
    assert head_cost(256, [100] * 64) == (25600, 6400)


def test_mask_schedule() -> None:
    assert tokens_per_iteration(64, 1) == [64]
    assert tokens_per_iteration(64, 64) == [1] * 64
    # masked after k: floor(64 cos(pi/16 (k+1))) = 62, 59, 53, 45, 35, 24, 12, then 0
    assert tokens_per_iteration(64, 8) == [2, 3, 6, 8, 10, 11, 12, 12]
    with pytest.raises(ValueError, match="num_iterations"):
        tokens_per_iteration(64, 65)


def test_request_form_round_trips() -> None:
    strategy = Strategy.parse({"schedule": {"name": "disa", "upper": 50, "lower": 5, "kind": "linear"}})
    assert strategy.schedule == {"name": "disa", "upper": 50, "lower": 5, "kind": "linear"}
    assert Strategy.parse(strategy.to_json()) == strategy
    schedule = get_registry().build("schedule", strategy.schedule)
    assert isinstance(schedule, DisaSchedule) and schedule.plan(3) == [50, 27, 5]
    assert Strategy.parse({"schedule": "disa"}).schedule == {"name": "disa", "upper": 50, "lower": 5, "kind": "linear"}


@pytest.mark.parametrize(
    ("schedule", "field", "words"),
    [
        ({"lower": 60, "upper": 50}, "strategy.schedule.lower", "above upper (50)"),
        ({"lower": 0}, "strategy.schedule.lower", "greater than or equal to 1"),
        ({"upper": -3}, "strategy.schedule.upper", "greater than or equal to 1"),
        ({"upper": 2000}, "strategy.schedule.upper", "less than or equal to 1000"),
        ({"kind": "exponential"}, "strategy.schedule.kind", "linear"),
        ({"steps": 5}, "strategy.schedule.steps", "unknown parameter"),
    ],
)
def test_invalid_requests_name_the_field(schedule: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        Strategy.parse({"schedule": {"name": "disa", **schedule}})
    assert info.value.field == field
    assert words in str(info.value)


def test_annealer_guards() -> None:
    with pytest.raises(InvalidRequestError, match="lower"):
        StepAnnealer(5, 0)
    with pytest.raises(ValueError, match="outside"):
        StepAnnealer(50, 5).steps_for(4, 4)


def test_refused_by_image_models() -> None:
    schedule = DisaSchedule()
    with pytest.raises(IncompatibleStrategyError) as info:
        schedule.check_request("shapes", Strategy.parse({"schedule": "disa"}), None)
    assert info.value.field == "strategy.schedule.name" and "'shapes'" in info.value.message
