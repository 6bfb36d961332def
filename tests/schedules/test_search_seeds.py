"""Seeding AutoDiffusion's stage 1 from known sequences (`EvolutionarySearch(seeds=...)`, `accel-diffusion search
--seed-timesteps`): the seeds join generation 0, the result is never worse than a seed, the search stays
deterministic and resumable (the resume key holds the seeds), and bad values are refused naming the flag."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from search_fitnesses import Interrupt, distance_to, interrupted_at

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.autodiffusion import EvolutionarySearch, SearchConfig, SearchSpace, random_candidate
from accel_diffusion.schedules.search_command import resolve_components, seeded_sequences
from accel_diffusion.schedules.searched import load_artifact

pytestmark = pytest.mark.usefixtures("single_thread")

GHVB = {"name": "ghvb", "order": 0.8}
BEST_KNOWN = (897, 818, 700, 71)  # session 11's best GHVB 0.8 CFG 5 4-step sequence (docs/benchmarks.md)
SMALL = SearchConfig(population=12, select=4, mutations=5, crossovers=4, mutation_prob=0.25, mutation_radius=20,
                     epochs=4, seed=0)


def test_seeds_join_generation_zero_after_uniform_and_before_the_grids() -> None:
    space = SearchSpace(4, 1000)
    grids = [(999, 899, 599, 199), (999, 949, 799, 399)]
    seeds = [BEST_KNOWN, (950, 700, 400, 90)]
    fitness, calls = distance_to((900, 600, 300, 100))
    config = SearchConfig(population=20, select=4, mutations=8, crossovers=4, mutation_prob=0.25, epochs=0)
    EvolutionarySearch(space, fitness, config, grids=grids, seeds=seeds).run()
    assert calls[:5] == [space.uniform(), *seeds, *grids]
    assert len(calls) == 20
    # generation 0's mutants take turns among the seeds and uniform: 5 mutants (20 - 10 - 1 - 2 - 2), the 1st and 4th
    # of the first seed, the 2nd and 5th of the second (a random sequence shares 2 timesteps with one: ~1 in 10^4)
    mutants = calls[5:10]
    assert [len(set(m) & set(seeds[0])) >= 2 for m in mutants] == [True, False, False, True, False]
    assert [len(set(m) & set(seeds[1])) >= 2 for m in mutants] == [False, True, False, False, True]


def test_each_seed_gets_a_mutant_in_a_full_generation_zero() -> None:
    space = SearchSpace(4, 1000)
    grids = [(999, 899, 599, 199), (999, 949, 799, 399), (801, 601, 401, 201)]
    fitness, calls = distance_to((900, 600, 300, 100))
    config = SearchConfig(population=4, select=2, mutations=1, crossovers=1, mutation_prob=0.25, epochs=0)
    EvolutionarySearch(space, fitness, config, grids=grids, seeds=[BEST_KNOWN]).run()
    assert calls[:5] == [space.uniform(), BEST_KNOWN, *grids] and len(calls) == 6  # over the population of 4
    assert len(set(calls[5]) & set(BEST_KNOWN)) >= 2 and calls[5] != BEST_KNOWN  # the seed's mutant


def test_a_seed_equal_to_uniform_or_a_grid_is_scored_once() -> None:
    space = SearchSpace(4, 1000)
    fitness, calls = distance_to((900, 600, 300, 100))
    config = SearchConfig(population=8, select=3, mutations=3, crossovers=2, epochs=0)
    EvolutionarySearch(space, fitness, config, grids=[(999, 899, 599, 199)],
                       seeds=[space.uniform(), (199, 599, 899, 999)]).run()
    assert calls[:2] == [space.uniform(), (999, 899, 599, 199)] and len(calls) == len(set(calls)) == 8


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**32), st.integers(0, 3))
def test_the_ranked_result_is_never_worse_than_a_seed(steps: int, draw: int, extra: int) -> None:
    """A seed better than anything the search breeds still ranks first: elitism over every scored candidate."""
    rng = random.Random(draw)
    space = SearchSpace(steps, rng.randrange(steps + 1, 400))
    target = random_candidate(rng, space)
    seeds = [random_candidate(rng, space) for _ in range(1 + extra)]
    fitness, calls = distance_to(target)
    config = SearchConfig(population=6, select=2, mutations=2, crossovers=1, mutation_prob=0.3, epochs=2,
                          seed=rng.randrange(1000))
    result = EvolutionarySearch(space, fitness, config, seeds=seeds).run()
    assert calls[1:1 + len(set(seeds) - {space.uniform()})] == list(dict.fromkeys(
        s for s in seeds if s != space.uniform()))
    scored = dict(result.ranked)
    assert all(seed in scored for seed in seeds)
    assert result.best[1] <= min(fitness(seed) for seed in seeds)
    assert [f for _, f in result.ranked] == sorted(f for _, f in result.ranked)


def test_seeded_searches_are_deterministic_and_the_seeds_change_the_search() -> None:
    space = SearchSpace(4, 1000)
    runs = []
    for seeds in ([BEST_KNOWN], [BEST_KNOWN], [], [(950, 700, 400, 90)]):
        fitness, calls = distance_to((900, 600, 300, 100))
        runs.append((calls, EvolutionarySearch(space, fitness, SMALL, seeds=seeds).run().ranked))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0] and runs[0][0] != runs[3][0]


def test_no_seeds_is_the_unseeded_search_unchanged() -> None:
    """Pinned before seeding existed (same calls, same order): an unseeded search and its state file's key are
    what they were, so state files of earlier searches still resume."""
    fitness, calls = distance_to((900, 600, 300, 100))
    search = EvolutionarySearch(SearchSpace(4, 1000), fitness, SMALL, seeds=())
    result = search.run()
    digest = hashlib.sha256(json.dumps(calls).encode()).hexdigest()[:16]
    assert (len(calls), digest, result.best) == (UNSEEDED_CALLS, UNSEEDED_DIGEST, UNSEEDED_BEST)
    assert set(search._identity()) == {"space", "config", "grids"}


UNSEEDED_CALLS, UNSEEDED_DIGEST, UNSEEDED_BEST = 60, "d8e7892d12f8be0d", ((895, 593, 249, 45), 118.0)  # cae07f3's


def test_a_seeded_search_resumes_to_the_uninterrupted_result_and_other_seeds_are_refused(tmp_path: Path) -> None:
    space, target = SearchSpace(4, 1000), (900, 600, 300, 100)
    fitness, full_calls = distance_to(target)
    full = EvolutionarySearch(space, fitness, SMALL, seeds=[BEST_KNOWN]).run()
    state, calls = tmp_path / "search.json", []

    def search(seeds: list[tuple[int, ...]], limit: int = 10**9) -> EvolutionarySearch:
        return EvolutionarySearch(space, interrupted_at(target, calls, limit), SMALL, seeds=seeds, state_path=state)

    for limit in (1, 2, 20):  # before the seed, right after it, in generation 1
        with pytest.raises(Interrupt):
            search([BEST_KNOWN], limit).run()
    assert json.loads(state.read_text())["identity"]["seeds"] == [list(BEST_KNOWN)]
    for other in ([], [(950, 700, 400, 90)], [BEST_KNOWN, (950, 700, 400, 90)]):
        with pytest.raises(ValueError, match="belongs to another search"):
            search(other).run()
    resumed = search([BEST_KNOWN]).run()
    assert calls == full_calls and resumed.ranked == full.ranked and resumed.finished


# --- `accel-diffusion search --seed-timesteps` on the shipped shapes model ---------------------------------------


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ModelRegistry.default())


@pytest.fixture(scope="module")
def ghvb_space(engine: Engine) -> tuple[dict, dict, SearchSpace]:
    shapes = engine.models.get("shapes")
    sampler, _ = resolve_components(shapes.spec, GHVB, None)
    return dict(shapes.scheduler_config), sampler, SearchSpace(4, 1000)


def test_seed_values_are_comma_lists_schedules_or_artifacts(ghvb_space, tmp_path: Path) -> None:
    config, sampler, space = ghvb_space
    artifact = tmp_path / "best.json"
    artifact.write_text(json.dumps({"format": "accel-diffusion/searched-schedule@1", "timesteps": [950, 700, 400, 90]}))
    karras = tmp_path / "karras.json"
    karras.write_text('{"name": "karras", "rho": 3}')
    seeds = seeded_sequences([" 897, 818,700,71 ", "71,700,818,897", str(artifact), str(karras),
                              '{"name": "timesteps", "timesteps": [999, 500, 250, 10]}', "[998, 501, 2, 1]"],
                             config, sampler, space)
    assert seeds == [BEST_KNOWN, (950, 700, 400, 90), (999, 865, 636, 211), (999, 500, 250, 10), (998, 501, 2, 1)]


@pytest.mark.parametrize(("value", "why"), [
    ("897,818,700", "has 3 timesteps; the search is over 4"),
    ("897,818,818,71", "repeats a timestep"),
    ("1000,818,700,71", "leaves 0 .. 999"),
    ("897,,700,71", "is not a comma list of integers"),
    ("no-such-file.json", "is neither a comma list of 4 timesteps nor a JSON file"),
    ("{not json", "is not JSON"),
    ('{"name": "karras", "rho": 3, "bogus": 1}', "gives ghvb no 4 distinct timesteps"),
    ('{"format": "accel-diffusion/searched-schedule@1", "timesteps": [999, 500, 250, 125, 60, 10]}',
     "has 6 timesteps; the search is over 4"),
])
def test_bad_seed_values_are_refused_naming_the_flag(ghvb_space, value: str, why: str) -> None:
    config, sampler, space = ghvb_space
    with pytest.raises(InvalidRequestError, match="--seed-timesteps") as refused:
        seeded_sequences([value], config, sampler, space)
    assert refused.value.field == "seed_timesteps" and why in refused.value.message


def test_search_cli_seeds_generation_zero_records_the_seeds_and_refuses_bad_ones(
        engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "schedules"
    args = ["search", "--steps", "4", "--sampler", json.dumps(GHVB), "--guidance-scale", "5", "--out", "seeded",
            "--dir", str(folder), "--fitness", "paired_distance", "--images", "1", "--rescore-images", "1",
            "--teacher-steps", "6", "--population", "3", "--select", "2", "--mutations", "1", "--crossovers", "1",
            "--epochs", "0"]
    bad = CliRunner().invoke(main, [*args, "--seed-timesteps", "897,818,700"])
    assert bad.exit_code == 2 and "--seed-timesteps '897,818,700': " in bad.output
    both = CliRunner().invoke(main, [*args, "--seed-timesteps", "897,818,700,71", "--skip-budget", "0.9",
                                     "--timesteps-from", '{"name": "karras", "rho": 3}'])
    assert both.exit_code == 2 and "give one of them" in both.output

    run = CliRunner().invoke(main, [*args, "--seed-timesteps", "897,818,700,71"])
    assert run.exit_code == 0, run.output
    artifact = load_artifact(folder / "seeded.json")
    assert artifact.search.seed_timesteps == [list(BEST_KNOWN)]
    # generation 0 only: uniform, the seed, the 6 other grids GHVB builds at 4 steps (trailing is uniform) and a mutant
    # of the seed, whatever the population; the winner is no worse than the seed
    sampler, guidance = resolve_components(engine.models.get("shapes").spec, GHVB, {"name": "cfg", "scale": 5.0})
    fitness = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=1, teacher_steps=6,
                                    kind="paired_distance")
    assert artifact.search.evaluations == 9
    assert artifact.fitness.value == pytest.approx(fitness(artifact.timesteps), abs=1e-12)
    assert artifact.fitness.value <= fitness(BEST_KNOWN) + 1e-12
