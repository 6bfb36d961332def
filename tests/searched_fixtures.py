"""Searched-schedule artifacts for tests: a hand-written one for the tiny test model (``tiny_artifact``, the
requests naming it; tests/schedules/conftest.py's ``schedules`` fixture installs it), and a real one: AutoDiffusion
stage 1 run on the `gmm` oracle.

The gmm search's fitness is the paired distance to a 100-step DPM-Solver++ run from the same noise (the engine's
loop, as tests/component_pins.py drives it); the search is deterministic, so its result is pinned here.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
from pathlib import Path

import torch
from component_pins import engine_run

from accel_diffusion.schedules.autodiffusion import EvolutionarySearch, SearchConfig, SearchSpace
from accel_diffusion.schedules.searched import SearchCost, SearchedArtifact, SearchFitness
from accel_diffusion.strategy import GenerationRequest

GMM_SEARCHED_ID = "gmm-dpmpp_2m-4"
GMM_SEARCHED_TIMESTEPS = [823, 488, 438, 63]
GMM_SEARCH = SearchConfig(population=12, select=4, mutations=5, crossovers=4, mutation_prob=0.25, mutation_radius=20,
                          epochs=5, seed=0)
SAMPLER = {"name": "dpmpp_2m"}
TINY_TIMESTEPS = [999, 700, 400, 100]


def tiny_artifact(schedule_id: str = "tiny-dpmpp-4", model: str = "tiny-sd", **changes: object) -> SearchedArtifact:
    """A searched schedule for the tiny test model (``tiny-sd``): 4 timesteps, no skipped blocks unless changed."""
    fields = {"id": schedule_id, "model": model, "sampler": {"name": "dpmpp_2m"},
              "guidance": {"name": "cfg", "scale": 5.0}, "steps": 4, "timesteps": TINY_TIMESTEPS,
              "skipped_blocks": [[], [], [], []],
              "fitness": SearchFitness(kind="paired_distance", value=0.25, samples=8),
              "search": SearchCost(evaluations=30, wall_time_s=12.5, command="accel-diffusion search ..."), "seed": 3}
    return SearchedArtifact(**{**fields, **changes})


def request(**fields: object) -> GenerationRequest:
    """A request for ``tiny-sd`` naming the searched schedule ``tiny-dpmpp-4`` (``strategy`` fields merged in)."""
    strategy = {"schedule": {"name": "searched", "id": "tiny-dpmpp-4"}} | dict(fields.pop("strategy", {}))
    return GenerationRequest.create(**{"model": "tiny-sd", "prompt": "a red circle", "seed": 1, "strategy": strategy,
                                       **fields})


@functools.cache
def gmm_teacher() -> torch.Tensor:
    return engine_run(SAMPLER, {"name": "timesteps", "timesteps": list(range(999, -1, -10))})[1]


def gmm_paired_distance(timesteps: tuple[int, ...]) -> float:
    """Mean distance of the 64 oracle samples to the teacher's from the same noise."""
    x = engine_run(SAMPLER, {"name": "timesteps", "timesteps": list(timesteps)})[1]
    return float((x - gmm_teacher()).norm(dim=1).mean())


@functools.cache
def gmm_search() -> tuple[SearchedArtifact, float]:
    """(the artifact, the uniform schedule's paired distance)."""
    space = SearchSpace(4, 1000)
    start = time.perf_counter()
    result = EvolutionarySearch(space, gmm_paired_distance, GMM_SEARCH).run()
    timesteps, fitness = result.best
    artifact = SearchedArtifact(
        id=GMM_SEARCHED_ID, model="gmm", sampler=SAMPLER, guidance={"name": "none"}, steps=4,
        timesteps=list(timesteps), skipped_blocks=[[] for _ in timesteps],
        fitness=SearchFitness(kind="paired_distance", value=fitness, samples=64),
        search=SearchCost(evaluations=result.evaluations, wall_time_s=time.perf_counter() - start,
                          command="tests/searched_fixtures.py"),
        seed=GMM_SEARCH.seed,
    )
    return artifact, gmm_paired_distance(space.uniform())


@functools.cache
def gmm_searched_dir() -> Path:
    """A folder holding the gmm artifact (removed when the test process ends)."""
    folder = Path(tempfile.mkdtemp(prefix="searched-schedules-"))
    atexit.register(shutil.rmtree, folder, True)
    gmm_search()[0].save(folder)
    return folder
