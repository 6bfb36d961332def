"""``accel-diffusion search``: run the AutoDiffusion timestep search on a model and save its artifact.

The search (``autodiffusion.py``) proposes timestep sequences; each is scored through the engine by
``eval/schedule_fitness.py`` (no second denoising loop); the best is written as a searched-schedule
artifact that ``{"schedule": {"name": "searched", "id": ...}}`` then names.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.autodiffusion import EvolutionarySearch, SearchConfig, SearchResult, SearchSpace
from accel_diffusion.strategy import Strategy

if TYPE_CHECKING:  # the command's module stays light to import: `accel-diffusion --help` loads it
    from accel_diffusion.schedules.searched import SearchedArtifact

# the hand-made grids put in generation 0 (those the sampler can build at K steps, rounded to integers)
HAND_MADE_GRIDS: tuple[dict[str, Any], ...] = (
    {"name": "spacing"}, {"name": "spacing", "spacing": "trailing"}, {"name": "spacing", "spacing": "leading"},
    {"name": "spacing", "spacing": "linspace"}, {"name": "spacing", "spacing": "quadratic_t"},
    {"name": "spacing", "spacing": "log_snr"}, {"name": "karras"}, {"name": "karras", "rho": 3.0},
)


def resolve_components(spec: Any, sampler: Any, guidance: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The normalized sampler and guidance (the model's defaults for what is None)."""
    data = {k: v for k, v in (("sampler", sampler), ("guidance", guidance)) if v is not None}
    strategy = Strategy.parse(data).resolved_over(spec.default_strategy)
    assert strategy.sampler is not None and strategy.guidance is not None
    return strategy.sampler, strategy.guidance


def hand_made_grids(scheduler_config: dict[str, Any], sampler: dict[str, Any], space: SearchSpace) -> list[tuple]:
    """The integer timesteps of every hand-made grid the sampler builds at K steps (distinct, valid ones)."""
    import torch

    registry, grids = get_registry(), []
    for schedule_spec in HAND_MADE_GRIDS:
        schedule = registry.build("schedule", schedule_spec)
        try:
            scheduler = registry.build("sampler", sampler).make_scheduler(scheduler_config,
                                                                          schedule.scheduler_options())
            schedule.check_compatible(scheduler, sampler["name"])
            schedule.set_timesteps(scheduler, space.num_steps, torch.device("cpu"))
            grid = space.check([round(float(t)) for t in scheduler.timesteps])
        except (InvalidRequestError, ValueError, TypeError):
            continue
        if grid not in grids:
            grids.append(grid)
    return grids


def run_search(
    engine: Any,
    *,
    model: str,
    steps: int,
    schedule_id: str,
    sampler: Any = None,
    guidance: Any = None,
    fitness: str = "paired_distance",
    images: int = 49,
    rescore_images: int = 98,
    rescore_top: int = 3,
    teacher_steps: int = 50,
    config: SearchConfig | None = None,
    time_budget_s: float | None = None,
    schedules_dir: str | Path | None = None,
    state_path: str | Path | None = None,
    progress: bool = True,
    command: str = "",
) -> tuple[SearchedArtifact | None, Path | None, SearchResult]:
    """Search, save the artifact into ``schedules_dir`` and return (artifact, its path, the SearchResult); the
    artifact is None when the time budget ran out first (the state file keeps the search for a resumed run)."""
    from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness
    from accel_diffusion.schedules.explicit import ExplicitTimesteps
    from accel_diffusion.schedules.searched import (
        ID_PATTERN,
        SCHEDULES_DIR_ENV,
        SearchCost,
        SearchedArtifact,
        SearchFitness,
    )

    if not re.fullmatch(ID_PATTERN, schedule_id):
        raise InvalidRequestError("out", f"{schedule_id!r} is not a schedule id", "letters, digits, '.', '_', '-'")
    loaded = engine.models.get(model)
    sampler_spec, guidance_spec = resolve_components(loaded.spec, sampler, guidance)
    scheduler_config = dict(loaded.scheduler_config)
    probe = get_registry().build("sampler", sampler_spec).make_scheduler(scheduler_config, {})
    ExplicitTimesteps([1]).check_compatible(probe, sampler_spec["name"])  # refuses samplers without timesteps=
    space = SearchSpace(steps, int(scheduler_config["num_train_timesteps"]))
    config = config or SearchConfig()
    folder = Path(schedules_dir or os.environ.get(SCHEDULES_DIR_ENV) or "schedules")
    folder.mkdir(parents=True, exist_ok=True)
    state = Path(state_path) if state_path is not None else folder / f"{schedule_id}.search-state"
    common = {"sampler": sampler_spec, "guidance": guidance_spec, "model": model, "seed": config.seed,
              "teacher_steps": teacher_steps}
    cheap = ShapesScheduleFitness(engine, kind=fitness, images=images, **common)  # type: ignore[arg-type]
    costly = (ShapesScheduleFitness(engine, kind=fitness, images=rescore_images, judge=cheap.judge,
                                    **common)  # type: ignore[arg-type]
              if rescore_images > images and rescore_top > 0 else None)
    start = time.perf_counter()
    result = EvolutionarySearch(space, cheap, config, grids=hand_made_grids(scheduler_config, sampler_spec, space),
                                state_path=state, time_budget_s=time_budget_s, rescore=costly,
                                rescore_top=rescore_top, progress=progress).run()
    if not result.finished:
        return None, None, result
    timesteps, value = result.best
    artifact = SearchedArtifact(
        id=schedule_id, model=model, sampler=sampler_spec, guidance=guidance_spec, steps=steps,
        timesteps=list(timesteps), skipped_blocks=[[] for _ in timesteps],
        fitness=SearchFitness(kind=fitness, value=value, samples=len(costly.prompts) if costly else images),
        search=SearchCost(evaluations=result.evaluations, wall_time_s=max(result.wall_time_s,
                                                                         time.perf_counter() - start),
                          command=command),
        seed=config.seed,
    )
    path = artifact.save(folder)
    state.unlink(missing_ok=True)
    return artifact, path, result


@click.command("search")
@click.option("--model", "-m", default="shapes", show_default=True, help="Model id from the registry.")
@click.option("--steps", type=click.IntRange(1, 50), required=True, help="K: the number of timesteps searched.")
@click.option("--sampler", default=None, help="Sampler name or JSON (default: the model's); needs explicit timesteps.")
@click.option("--guidance", default=None, help="Guidance name or JSON (default: the model's).")
@click.option("--guidance-scale", type=float, default=None, help="Shorthand for --guidance with CFG at this scale.")
@click.option("--out", "schedule_id", required=True, help="The artifact's id: written as DIR/ID.json.")
@click.option("--dir", "schedules_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of searched schedules (default: $ACCEL_DIFFUSION_SCHEDULES_DIR, else ./schedules).")
@click.option("--fitness", type=click.Choice(["paired_distance", "teacher_fd", "prompt_accuracy"]),
              default="paired_distance", show_default=True, help="What the search minimises (see docs).")
@click.option("--images", type=click.IntRange(1, 98), default=49, show_default=True,
              help="Search prompts (one image each, fixed seeds) every candidate is scored on; never the held-out ones.")
@click.option("--rescore-images", type=click.IntRange(1, 98), default=98, show_default=True,
              help="The top candidates are re-scored on this many at the end (<= --images: no re-scoring).")
@click.option("--teacher-steps", type=click.IntRange(2, 1000), default=50, show_default=True)
@click.option("--population", type=click.IntRange(2), default=20, show_default=True)
@click.option("--epochs", type=click.IntRange(0), default=10, show_default=True)
@click.option("--select", type=click.IntRange(1), default=5, show_default=True, help="Parents kept per epoch.")
@click.option("--mutations", type=click.IntRange(0), default=10, show_default=True)
@click.option("--crossovers", type=click.IntRange(0), default=6, show_default=True)
@click.option("--mutation-prob", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--mutation-radius", type=click.IntRange(0), default=20, show_default=True,
              help="Half the mutated timesteps move at most this far (0: uniform draws only, as the reference).")
@click.option("--seed", type=click.IntRange(0, 900_000), default=0, show_default=True)
@click.option("--time-budget", "time_budget_s", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds (state kept: the same command resumes).")
@click.pass_context
def search_command(ctx: click.Context, model: str, steps: int, sampler: str | None, guidance: str | None,
                   guidance_scale: float | None, schedule_id: str, schedules_dir: str | None, fitness: str,
                   images: int, rescore_images: int, teacher_steps: int, population: int, epochs: int, select: int,
                   mutations: int, crossovers: int, mutation_prob: float, mutation_radius: int, seed: int,
                   time_budget_s: float | None) -> None:
    """Search K timesteps for a model, sampler and guidance (AutoDiffusion stage 1) and save the artifact."""
    from accel_diffusion.cli import _json_arg, _registry
    from accel_diffusion.engine import Engine
    from accel_diffusion.strategy import merge_guidance_scale
    from accel_diffusion.third_party_output import quiet_third_party_output

    components = merge_guidance_scale({k: _json_arg(v, f"strategy.{k}") for k, v in
                                       (("sampler", sampler), ("guidance", guidance)) if v is not None},
                                      guidance_scale) or {}
    try:
        config = SearchConfig(population=population, select=select, mutations=mutations, crossovers=crossovers,
                              mutation_prob=mutation_prob, mutation_radius=mutation_radius, epochs=epochs, seed=seed)
    except ValueError as exc:
        raise InvalidRequestError("population", str(exc)) from None
    import importlib.util

    if importlib.util.find_spec("torchmetrics") is None:  # the teacher FD of the fitness
        raise click.ClickException("search needs the 'eval' extra: pip install 'accel-diffusion[eval]'") from None
    quiet_third_party_output()
    artifact, path, result = run_search(
        Engine(_registry(ctx)), model=model, steps=steps, schedule_id=schedule_id,
        sampler=components.get("sampler"), guidance=components.get("guidance"), fitness=fitness, images=images,
        rescore_images=rescore_images, teacher_steps=teacher_steps, config=config, time_budget_s=time_budget_s,
        schedules_dir=schedules_dir, progress=True, command=shlex.join(["accel-diffusion", *sys.argv[1:]]))
    if artifact is None:
        best = f" (best so far {result.ranked[0][1]:.4g})" if result.ranked else ""
        click.echo(f"time budget spent after {result.evaluations} candidates{best}; run the same command again "
                   "to continue", err=True)
        sys.exit(3)
    click.echo(f"{path}: timesteps {artifact.timesteps}, {fitness} {artifact.fitness.value:.4g} "
               f"({result.evaluations} candidates, {artifact.search.wall_time_s:.0f} s)")
