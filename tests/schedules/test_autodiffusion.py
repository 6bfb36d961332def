"""AutoDiffusion stages 1 and 2 (schedules/autodiffusion.py): operator invariants, the searches on synthetic fitnesses
with known optima, determinism, resumption, and the reference code's three bugs (spec §4.5) absent."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from search_fitnesses import Interrupt, distance_to, interrupted_at

from accel_diffusion.schedules.autodiffusion import (
    EvolutionarySearch,
    SearchConfig,
    SearchSpace,
    SkipPlanSearch,
    SkipSpace,
    crossover,
    crossover_plan,
    mutate,
    mutate_plan,
    random_candidate,
    random_plan,
)

SMALL = SearchConfig(population=20, select=5, mutations=10, crossovers=6, mutation_prob=0.25, mutation_radius=3,
                     epochs=30, seed=0)


def assert_valid(candidate: tuple[int, ...], space: SearchSpace) -> None:
    assert len(candidate) == space.num_steps
    assert all(a > b for a, b in pairwise(candidate)), candidate  # unique and sorted
    assert all(0 <= t < space.num_train_timesteps for t in candidate)
    assert all(type(t) is int for t in candidate)


@st.composite
def space_and_rng(draw: st.DrawFn) -> tuple[SearchSpace, random.Random]:
    steps = draw(st.integers(1, 12))
    timesteps = draw(st.integers(steps + 1, 1000))
    return SearchSpace(steps, timesteps), random.Random(draw(st.integers(0, 2**32)))


@settings(max_examples=300, deadline=None)
@given(space_and_rng(), st.floats(0.0, 1.0), st.integers(0, 50))
def test_mutation_keeps_invariants_and_always_changes_the_parent(case, prob, radius) -> None:
    space, rng = case
    parent = random_candidate(rng, space)
    assert_valid(parent, space)
    child = mutate(parent, rng, space, prob, radius)
    assert_valid(child, space)
    assert child != parent  # the reference's mutation could be a no-op (`==` instead of `=`)


@settings(max_examples=300, deadline=None)
@given(space_and_rng())
def test_crossover_keeps_k_unique_sorted_timesteps(case) -> None:
    space, rng = case
    first, second = random_candidate(rng, space), random_candidate(rng, space)
    child = crossover(first, second, rng, space)
    assert_valid(child, space)
    # every gene comes from a parent unless both parents together have fewer than K distinct genes
    if len(set(first) | set(second)) >= space.num_steps:
        assert set(child) <= set(first) | set(second)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(0, 2**32))
def test_crossover_of_overlapping_parents_never_repeats_a_timestep(steps: int, seed: int) -> None:
    """Parents sharing timesteps at different positions: the reference's position-wise pick repeats
    them (and its set() then gives fewer than K steps)."""
    space = SearchSpace(steps, steps + 3)
    first = tuple(range(steps + 1, 1, -1))[:steps]  # (K+1 .. 2)
    second = tuple(range(steps, 0, -1))  # (K .. 1): first[i + 1] == second[i]
    rng = random.Random(seed)
    child = crossover(first, second, rng, space)
    assert_valid(child, space)


def test_naive_crossover_would_repeat_timesteps_on_those_parents() -> None:
    """The overlapping-parents case above is a real trap: picking position-wise without repair repeats."""
    first, second = (5, 4, 3, 2), (4, 3, 2, 1)
    repeats = 0
    for seed in range(50):
        rng = random.Random(seed)
        naive = [a if rng.random() < 0.5 else b for a, b in zip(first, second, strict=True)]
        repeats += len(set(naive)) < len(naive)
    assert repeats > 10


def test_space_checks_and_uniform() -> None:
    space = SearchSpace(4, 1000)
    assert space.uniform() == (999, 749, 499, 249)  # diffusers DDIM "trailing" at 4 steps
    assert SearchSpace(6, 1000).uniform() == (999, 832, 666, 499, 332, 166)
    assert space.check([249, 999, 499, 749]) == (999, 749, 499, 249)
    for bad, why in (([999, 749, 499], "has 3 timesteps"), ([999, 749, 749, 0], "repeats"),
                     ([1000, 749, 499, 0], "leaves 0 .. 999")):
        with pytest.raises(ValueError, match=why):
            space.check(bad)
    with pytest.raises(ValueError, match="must exceed num_steps"):
        SearchSpace(4, 4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_search_reaches_a_hidden_optimum_within_its_budget(seed: int) -> None:
    space = SearchSpace(4, 100)
    target = random_candidate(random.Random(99 + seed), space)
    fitness, calls = distance_to(target)
    config = SearchConfig(**{**SMALL.__dict__, "seed": seed})
    result = EvolutionarySearch(space, fitness, config).run()
    assert result.best == (target, 0.0)
    assert result.finished
    assert calls[0] == space.uniform()  # uniform is candidate 0
    assert len(calls) == len(set(calls)) == result.evaluations <= config.population * (config.epochs + 1)
    assert len(result.best_per_epoch) == config.epochs + 1
    assert all(b <= a for a, b in pairwise(result.best_per_epoch))
    assert result.best_per_epoch[0] > 0  # the optimum was found by the search, not in generation 0


def test_generation_zero_holds_uniform_then_the_hand_made_grids() -> None:
    space = SearchSpace(4, 1000)
    grids = [(999, 899, 599, 199), (999, 949, 799, 399)]
    fitness, calls = distance_to((900, 600, 300, 100))
    EvolutionarySearch(space, fitness, SearchConfig(population=10, select=3, mutations=4, crossovers=3, epochs=0),
                       grids=grids).run()
    assert calls[:3] == [space.uniform(), *grids]
    assert len(calls) == 10


def test_the_final_generation_is_ranked() -> None:
    """Every call is better than the last: the best candidate is the last one evaluated, in the final
    generation, which the reference evaluated after its last ranking and never reported."""
    space = SearchSpace(3, 200)
    calls: list[tuple[int, ...]] = []

    def improving(candidate: tuple[int, ...]) -> float:
        calls.append(candidate)
        return -float(len(calls))

    result = EvolutionarySearch(space, improving, SearchConfig(population=8, select=3, mutations=3, crossovers=2,
                                                               epochs=3)).run()
    assert result.best == (calls[-1], -float(len(calls)))
    assert [c for c, _ in result.ranked] == calls[::-1]


def test_same_seed_same_search_other_seed_other_search() -> None:
    space = SearchSpace(4, 1000)
    runs = []
    for seed in (5, 5, 6):
        fitness, calls = distance_to((900, 600, 300, 100))
        config = SearchConfig(population=12, select=4, mutations=5, crossovers=4, epochs=4, seed=seed)
        runs.append((calls, EvolutionarySearch(space, fitness, config).run().ranked))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_an_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    space, target = SearchSpace(4, 100), (80, 55, 30, 5)
    config = SearchConfig(population=12, select=4, mutations=5, crossovers=4, mutation_radius=3, epochs=6, seed=3)
    fitness, full_calls = distance_to(target)
    full = EvolutionarySearch(space, fitness, config).run()

    state = tmp_path / "search.json"
    calls: list[tuple[int, ...]] = []

    for limit in (7, 30, 31, 50):  # mid generation 0, within later generations, twice in a row
        with pytest.raises(Interrupt):
            EvolutionarySearch(space, interrupted_at(target, calls, limit), config, state_path=state).run()
        assert len(calls) == limit
    resumed = EvolutionarySearch(space, interrupted_at(target, calls, 10**9), config, state_path=state).run()
    assert calls == full_calls  # nothing evaluated twice, nothing skipped, same order
    assert resumed.ranked == full.ranked and resumed.best_per_epoch == full.best_per_epoch
    assert resumed.finished


def test_time_budget_stops_cleanly_and_the_search_resumes(tmp_path) -> None:
    space, target = SearchSpace(4, 100), (80, 55, 30, 5)
    config = SearchConfig(population=10, select=3, mutations=4, crossovers=3, epochs=3, seed=1)
    fitness, full_calls = distance_to(target)
    full = EvolutionarySearch(space, fitness, config).run()
    state = tmp_path / "search.json"
    fitness, calls = distance_to(target)
    stopped = EvolutionarySearch(space, fitness, config, state_path=state, time_budget_s=0.0).run()
    assert not stopped.finished and stopped.evaluations == 0 and calls == []
    resumed = EvolutionarySearch(space, fitness, config, state_path=state, time_budget_s=600.0).run()
    assert resumed.finished and resumed.ranked == full.ranked and calls == full_calls  # the budget is per run


def test_each_resumed_run_gets_the_time_budget_afresh(tmp_path) -> None:
    import time

    space, state = SearchSpace(4, 100), tmp_path / "search.json"
    config = SearchConfig(population=10, select=3, mutations=4, crossovers=3, epochs=3, seed=1)

    def slow(candidate: tuple[int, ...]) -> float:
        time.sleep(0.03)
        return float(sum(candidate))

    counts = []
    for _ in range(3):
        result = EvolutionarySearch(space, slow, config, state_path=state, time_budget_s=0.1).run()
        counts.append(result.evaluations)
    assert not result.finished
    assert counts[0] >= 1 and counts[1] > counts[0] and counts[2] > counts[1]  # each run made progress
    assert result.wall_time_s >= 0.3  # the wall time adds up over the runs


def test_a_state_file_of_another_search_is_refused(tmp_path) -> None:
    state = tmp_path / "search.json"
    fitness, _ = distance_to((80, 55, 30, 5))
    EvolutionarySearch(SearchSpace(4, 100), fitness, SearchConfig(population=4, select=2, mutations=1, crossovers=1,
                                                                  epochs=0), state_path=state).run()
    assert json.loads(state.read_text())["epoch"] == 1
    with pytest.raises(ValueError, match="belongs to another search"):
        EvolutionarySearch(SearchSpace(4, 100), fitness, SearchConfig(population=4, select=2, mutations=1,
                                                                      crossovers=1, epochs=0, seed=9),
                           state_path=state).run()


def test_the_top_candidates_are_rescored_and_ranked_by_the_costlier_fitness() -> None:
    space = SearchSpace(4, 100)
    fitness, _ = distance_to((80, 55, 30, 5))
    rescored: list[tuple[int, ...]] = []

    def costlier(candidate: tuple[int, ...]) -> float:
        rescored.append(candidate)
        return float(-candidate[0])  # another order than the cheap fitness's

    result = EvolutionarySearch(space, fitness, SearchConfig(population=10, select=3, mutations=4, crossovers=3,
                                                             epochs=2), rescore=costlier, rescore_top=3).run()
    assert sorted(rescored) == sorted(c for c, _ in result.ranked[:3])
    assert [f for _, f in result.rescored] == sorted(-c[0] for c in rescored)
    assert result.best == result.rescored[0]


@st.composite
def skip_space_and_rng(draw: st.DrawFn) -> tuple[SkipSpace, random.Random]:
    steps, blocks = draw(st.integers(1, 10)), draw(st.integers(1, 16))
    max_skip = draw(st.integers(1, blocks))
    lowest = steps * (blocks - max_skip)
    # at the lowest budget with every block skippable, skipping everything is the only plan: nothing to mutate
    budget = draw(st.integers(lowest + (max_skip == blocks), steps * blocks))
    return SkipSpace(steps, blocks, budget, max_skip), random.Random(draw(st.integers(0, 2**32)))


@settings(max_examples=300, deadline=None)
@given(skip_space_and_rng(), st.floats(0.0, 1.0))
def test_skip_plan_operators_keep_the_budget_and_mutation_always_changes_a_skip_set(case, prob) -> None:
    space, rng = case
    first, second = random_plan(rng, space), random_plan(rng, space)
    child = mutate_plan(first, rng, space, prob)
    crossed = crossover_plan(first, second, rng, space)
    for plan in (first, second, child, crossed):
        assert space.check(plan) == plan  # sorted, in range, <= max_skip per step, within the budget
        assert space.cost(plan) <= space.budget
    assert child != first  # the reference's skip-set mutation (`==` for `=`) never changed anything


def test_skip_space_costs_and_refusals() -> None:
    space = SkipSpace(num_steps=4, num_blocks=12, budget=40, max_skip=3)
    assert space.cost(space.skip_nothing()) == 48  # over budget: a plan must skip 8 block calls
    plan = random_plan(random.Random(0), space)
    assert space.cost(plan) <= 40 and sum(len(s) for s in plan) >= 8
    with pytest.raises(ValueError, match="runs 48 blocks; the budget is 40"):
        space.check(space.skip_nothing())
    with pytest.raises(ValueError, match="below the cheapest plan's cost 36"):
        SkipSpace(num_steps=4, num_blocks=12, budget=35, max_skip=3)
    with pytest.raises(ValueError, match="no plan other than the parent"):
        mutate_plan(((),), random.Random(0), SkipSpace(1, 3, 3, 0), 1.0)


HARMLESS = (9, 10, 11)  # the synthetic stage-2 fitness: skipping any other block costs 1 per step


def harm(plan: tuple[tuple[int, ...], ...]) -> float:
    return float(sum(1 for step in plan for i in step if i not in HARMLESS))


def test_skip_search_reaches_the_known_optimum_within_its_budget() -> None:
    # 4 steps x 12 blocks, budget 40 blocks run: 8 block calls must be skipped; only 3 per step are harmless
    space = SkipSpace(num_steps=4, num_blocks=12, budget=40, max_skip=3)
    config = SearchConfig(population=16, select=4, mutations=8, crossovers=4, mutation_prob=0.3, epochs=15, seed=0)
    result = SkipPlanSearch(space, harm, config).run()
    plan, fitness = result.best
    assert fitness == 0.0 and space.check(plan) == plan and space.cost(plan) <= 40
    assert all(set(step) <= set(HARMLESS) for step in plan)
    assert result.best_per_epoch == sorted(result.best_per_epoch, reverse=True)  # elitism: never worse
    assert result.best_per_epoch[0] > 0  # generation 0 (random plans) did not have it
    assert result.evaluations <= 16 * 16
    again = SkipPlanSearch(space, harm, config).run()
    assert again.ranked == result.ranked  # deterministic for a seed
    other = SkipPlanSearch(space, harm, SearchConfig(**{**config.__dict__, "seed": 1})).run()
    assert other.ranked != result.ranked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skip_search_with_measured_costs_spends_its_budget_on_the_cheap_harmless_blocks(seed: int) -> None:
    # a 25% saving: skipping 10 of the 12 calls of the harmless blocks (0.1 of a UNet call each) is enough; the
    # free blocks 5..8 save nothing, the harmful costly ones would
    costs = (0.2, 0.2, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1)
    space = SkipSpace(4, 12, budget=0.75 * 4, max_skip=3, block_costs=costs, overhead=0.1)
    assert space.cost(space.skip_nothing()) == pytest.approx(4.0)  # full UNet calls
    assert space.cost(((9, 10, 11),) * 4) == pytest.approx(2.8)
    config = SearchConfig(population=20, select=5, mutations=10, crossovers=6, mutation_prob=0.3, epochs=25, seed=seed)
    plan, fitness = SkipPlanSearch(space, harm, config).run().best  # measured: reached by epoch 9, 13, 17
    assert fitness == 0.0 and all(set(step) <= set(HARMLESS) for step in plan) and space.cost(plan) <= 3.0 + 1e-9
    with pytest.raises(ValueError, match=r"budget 1.6 is below the cheapest plan's cost 2 \(4 steps, at most 3 of 12"):
        SkipSpace(4, 12, budget=1.6, max_skip=3, block_costs=costs, overhead=0.1)
    rng = random.Random(0)
    tight = SkipSpace(4, 12, budget=2.0, max_skip=3, block_costs=costs, overhead=0.1)  # only the costliest fit
    for _ in range(5):  # the repair trades cheap skips for costly ones until the plan fits
        plan = random_plan(rng, tight)
        assert tight.cost(plan) == pytest.approx(2.0)
        assert all(step[:2] == (0, 1) and step[2] in (2, 9, 10, 11) for step in plan)


def test_an_interrupted_skip_search_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    space = SkipSpace(num_steps=3, num_blocks=8, budget=20, max_skip=2)
    config = SearchConfig(population=10, select=3, mutations=4, crossovers=3, mutation_prob=0.3, epochs=4, seed=5)
    calls: list = []

    def fitness(plan):
        calls.append(plan)
        return harm(plan) + 0.01 * sum(sum(step) for step in plan)

    full = SkipPlanSearch(space, fitness, config).run()
    full_calls, calls[:] = list(calls), []
    state = tmp_path / "skip.json"

    def stopping_at(limit: int):
        def stop(plan):
            if len(calls) == limit:
                raise Interrupt
            return fitness(plan)
        return stop

    for limit in (4, 17):
        with pytest.raises(Interrupt):
            SkipPlanSearch(space, stopping_at(limit), config, state_path=state).run()
    resumed = SkipPlanSearch(space, stopping_at(10**9), config, state_path=state).run()
    assert calls == full_calls and resumed.ranked == full.ranked and resumed.finished
    assert json.loads(state.read_text())["identity"]["skip_space"]["budget"] == 20
