"""``accel-diffusion search``: run the AutoDiffusion timestep search on a model and save its artifact.

The search (``autodiffusion.py``) proposes timestep sequences; each is scored through the engine by
``eval/schedule_fitness.py`` (no second denoising loop); the best is written as a searched-schedule
artifact that ``{"schedule": {"name": "searched", "id": ...}}`` then names.
"""

from __future__ import annotations

import dataclasses
import json
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
    fitness: str = "prompt_accuracy",
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
    skip_budget: float | None = None,
    max_skip: int = 4,
    skip_config: SearchConfig | None = None,
    timesteps_from: str | None = None,
    skip_mode: str = "drop",
    skip_blocks: list[str] | None = None,
) -> tuple[SearchedArtifact | None, Path | None, SearchResult | None]:
    """Search, save the artifact into ``schedules_dir`` and return (artifact, its path, the SearchResult of the
    last stage run); the artifact is None when the time budget ran out first (the state files keep the search
    for a resumed run).

    With ``skip_budget`` (a fraction of the full UNet's time, e.g. 0.8), stage 2 then searches which blocks
    to skip at which of the found timesteps (at most ``max_skip`` per step) so that the measured cost model
    (``measure_block_costs``) puts the plan at no more than that fraction of the UNet time. ``timesteps_from``
    names an artifact (same model, sampler, guidance and step count) whose timesteps stage 2 starts from,
    instead of running stage 1 again; its search cost is added to the new artifact's. ``skip_mode`` is what a
    skipped block gives (``drop``: its skip connection; ``reuse``/``residual``: its output, or its residual, cached
    at the last step where it ran: the first step then runs every block) and ``skip_blocks`` limits the blocks
    stage 2 may skip (default: all of them)."""
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
    skip_state = folder / (f"{schedule_id}.skip-state" if skip_mode == "drop"
                           else f"{schedule_id}.{skip_mode}-skip-state")
    common = {"sampler": sampler_spec, "guidance": guidance_spec, "model": model, "seed": config.seed,
              "teacher_steps": teacher_steps}
    cheap = ShapesScheduleFitness(engine, kind=fitness, images=images, **common)  # type: ignore[arg-type]
    costly = (ShapesScheduleFitness(engine, kind=fitness, images=rescore_images, judge=cheap.judge,
                                    **common)  # type: ignore[arg-type]
              if rescore_images > images and rescore_top > 0 else None)
    start = time.perf_counter()
    result: SearchResult | None = None
    if timesteps_from is not None:
        timesteps, value, evaluations, wall_time_s = _stage_one_from(
            timesteps_from, folder, model, sampler_spec, guidance_spec, steps, skip_budget)
    else:
        result = EvolutionarySearch(space, cheap, config,
                                    grids=hand_made_grids(scheduler_config, sampler_spec, space), state_path=state,
                                    time_budget_s=time_budget_s, rescore=costly, rescore_top=rescore_top,
                                    progress=progress).run()
        if not result.finished:
            return None, None, result
        timesteps, value = result.best
        evaluations, wall_time_s = result.evaluations, result.wall_time_s
    skipped: list[list[str]] = [[] for _ in timesteps]
    unet_cost = None
    if skip_budget is not None:
        left = None if time_budget_s is None else max(time_budget_s - (time.perf_counter() - start), 0.0)
        stage2, skipped, value, unet_cost = _skip_search(
            engine, model, cheap, costly, timesteps, skip_budget, max_skip, skip_config or config,
            skip_state, left, rescore_top, progress, skip_mode, skip_blocks)
        if not stage2.finished:
            return None, None, stage2
        evaluations, wall_time_s, result = evaluations + stage2.evaluations, wall_time_s + stage2.wall_time_s, stage2
    artifact = SearchedArtifact(
        id=schedule_id, model=model, sampler=sampler_spec, guidance=guidance_spec, steps=steps,
        timesteps=list(timesteps), skipped_blocks=skipped, skip_mode=skip_mode,
        fitness=SearchFitness(kind=fitness, value=value, samples=len(costly.prompts) if costly else images),
        search=SearchCost(evaluations=evaluations, wall_time_s=max(wall_time_s, time.perf_counter() - start),
                          command=command, skip_budget=skip_budget, unet_cost=unet_cost),
        seed=config.seed,
    )
    path = artifact.save(folder)
    state.unlink(missing_ok=True)
    skip_state.unlink(missing_ok=True)
    return artifact, path, result


def _stage_one_from(schedule_id: str, folder: Path, model: str, sampler: dict[str, Any], guidance: dict[str, Any],
                    steps: int, skip_budget: float | None) -> tuple[tuple[int, ...], float, int, float]:
    """(timesteps, fitness, evaluations, wall time) of the artifact ``schedule_id`` (in ``folder`` or the
    configured folders), refused unless it was searched for the same model, sampler, guidance and steps."""
    from accel_diffusion.schedules.searched import find_artifact, load_artifact

    if skip_budget is None:
        raise InvalidRequestError("timesteps_from", "only stage 2 starts from an artifact: give --skip-budget too")
    path = folder / f"{schedule_id}.json"
    try:
        artifact = load_artifact(path) if path.is_file() else find_artifact(schedule_id)
    except (ValueError, InvalidRequestError) as exc:
        raise InvalidRequestError("timesteps_from", str(exc)) from None
    ours = {"model": model, "sampler": sampler, "guidance": guidance, "steps": steps}
    for key, value in ours.items():
        if getattr(artifact, key) != value:
            raise InvalidRequestError("timesteps_from", f"{schedule_id!r} was searched for {key} "
                                      f"{json.dumps(getattr(artifact, key))}, not {json.dumps(value)}")
    return (tuple(artifact.timesteps), artifact.fitness.value, artifact.search.evaluations,
            artifact.search.wall_time_s)


def block_cost_model(engine: Any, model: str, fitness: Any) -> tuple[list[str], dict[str, float]]:
    """The UNet's skippable blocks and each one's measured share of a UNet call, at the batch the fitness runs
    (its prompts, cond and uncond) and the model's latent size."""
    import torch

    from accel_diffusion.engine.block_skip import measure_block_costs, skippable_blocks

    loaded = engine.models.get(model)
    unet = loaded.pipeline.unet
    width, height = loaded.default_size
    rows = 2 * min(len(fitness.prompts), fitness.batch_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, height // loaded.vae_scale_factor,
                    width // loaded.vae_scale_factor, generator=gen, dtype=unet.dtype).to(unet.device)
    tokens = int(getattr(getattr(loaded.pipeline, "tokenizer", None), "model_max_length", 77))
    context = torch.randn(rows, tokens, unet.config.cross_attention_dim, generator=gen,
                          dtype=unet.dtype).to(unet.device)
    t = torch.tensor(500, device=unet.device)
    shares = measure_block_costs(unet, lambda: unet(x, t, encoder_hidden_states=context, return_dict=False))
    return skippable_blocks(unet), shares


def _skip_search(engine: Any, model: str, cheap: Any, costly: Any, timesteps: tuple[int, ...], skip_budget: float,
                 max_skip: int, config: SearchConfig, state: Path, time_budget_s: float | None, rescore_top: int,
                 progress: bool, mode: str = "drop", allowed: list[str] | None = None,
                 ) -> tuple[SearchResult, list[list[str]], float, float]:
    """Stage 2: (its SearchResult, the best plan's block names per step, its fitness, its modelled UNet cost
    as a fraction of the full UNet's). In a reuse mode the first step runs every block (its cache is filled
    there) and the plan covers the others; a skipped block costs its measured share in every mode."""
    from accel_diffusion.eval.schedule_fitness import SkipPlanFitness
    from accel_diffusion.schedules.autodiffusion import SkipPlanSearch, SkipSpace

    every, shares = block_cost_model(engine, model, cheap)
    unknown = sorted(set(allowed or ()) - set(every))
    if unknown:
        raise InvalidRequestError("skip_blocks", f"{unknown[0]!r} is not a skippable block of model {model!r}",
                                  ", ".join(every))
    blocks = [b for b in every if allowed is None or b in allowed]
    K = len(timesteps)
    first = 0 if mode == "drop" else 1
    if K - first < 1:
        raise InvalidRequestError("skip_mode", f"{mode!r} skips nothing in a 1-step schedule (its first step runs "
                                  "every block): use --skip-mode drop")
    rest = 1.0 - sum(shares[b] for b in blocks)  # a full UNet call costs 1
    try:
        space = SkipSpace(K - first, len(blocks), skip_budget * K - first, min(max_skip, len(blocks)),
                          tuple(shares[b] for b in blocks), rest)
    except ValueError as exc:
        raise InvalidRequestError("skip_budget", f"{exc}: raise --skip-budget or --max-skip") from None
    plan_fitness = SkipPlanFitness(cheap, timesteps, blocks, mode, first)  # type: ignore[arg-type]
    rescore = SkipPlanFitness(costly, timesteps, blocks, mode, first) if costly is not None else None  # type: ignore[arg-type]
    result = SkipPlanSearch(space, plan_fitness, config, state_path=state, time_budget_s=time_budget_s,
                            rescore=rescore, rescore_top=rescore_top, progress=progress).run()
    plan, value = result.best if result.ranked else (space.skip_nothing(), float("nan"))
    return result, plan_fitness.names(plan), value, (first + space.cost(plan)) / K


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
              default="prompt_accuracy", show_default=True,
              help="What the search minimises; the default agrees best with held-out accuracy (docs/benchmarks.md).")
@click.option("--images", type=click.IntRange(1, 98), default=49, show_default=True,
              help="Search prompts (one image each, fixed seeds) scored per candidate; never the held-out ones.")
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
@click.option("--budget-minutes", type=click.FloatRange(min=0), default=None,
              help="The wall-time budget in minutes (instead of --time-budget).")
@click.option("--skip-budget", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Stage 2: skip UNet blocks so the UNet runs at most this fraction of its full time (e.g. 0.8).")
@click.option("--max-skip", type=click.IntRange(0), default=4, show_default=True,
              help="Stage 2: blocks skipped at one step at most.")
@click.option("--skip-epochs", type=click.IntRange(0), default=None,
              help="Stage 2's generations (default: --epochs).")
@click.option("--skip-mode", type=click.Choice(["drop", "reuse", "residual"]), default="drop", show_default=True,
              help="Stage 2: a skipped block gives its skip connection (drop), its output of the last step where it "
                   "ran (reuse, DeepCache-style), or its skip connection plus that step's residual (residual).")
@click.option("--skip-blocks", default=None,
              help="Stage 2: the blocks it may skip, comma-separated (default: every ResNet and attention block).")
@click.option("--timesteps-from", default=None,
              help="Stage 2 only: start from this artifact's timesteps (same model, sampler, guidance, steps).")
@click.pass_context
def search_command(ctx: click.Context, model: str, steps: int, sampler: str | None, guidance: str | None,
                   guidance_scale: float | None, schedule_id: str, schedules_dir: str | None, fitness: str,
                   images: int, rescore_images: int, teacher_steps: int, population: int, epochs: int, select: int,
                   mutations: int, crossovers: int, mutation_prob: float, mutation_radius: int, seed: int,
                   time_budget_s: float | None, budget_minutes: float | None, skip_budget: float | None,
                   max_skip: int, skip_epochs: int | None, skip_mode: str, skip_blocks: str | None,
                   timesteps_from: str | None) -> None:
    """Search K timesteps for a model, sampler and guidance (AutoDiffusion stage 1), then, with --skip-budget,
    which UNet blocks to skip at which step (stage 2), and save the artifact."""
    if budget_minutes is not None:
        if time_budget_s is not None:
            raise InvalidRequestError("budget_minutes", "give --budget-minutes or --time-budget, not both")
        time_budget_s = 60.0 * budget_minutes
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
        skip_config = dataclasses.replace(config, epochs=skip_epochs) if skip_epochs is not None else None
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
        schedules_dir=schedules_dir, progress=True, command=shlex.join(["accel-diffusion", *sys.argv[1:]]),
        skip_budget=skip_budget, max_skip=max_skip, skip_config=skip_config, timesteps_from=timesteps_from,
        skip_mode=skip_mode, skip_blocks=[b.strip() for b in skip_blocks.split(",") if b.strip()] if skip_blocks
        else None)
    if artifact is None:
        best = f" (best so far {result.ranked[0][1]:.4g})" if result.ranked else ""
        click.echo(f"time budget spent after {result.evaluations} candidates{best}; run the same command again "
                   "to continue", err=True)
        sys.exit(3)
    skips = "" if artifact.search.unet_cost is None else (
        f", skipped blocks {artifact.skipped_blocks} ({artifact.skip_mode}; UNet time x{artifact.search.unet_cost:.3f} "
        "by the cost model)")
    click.echo(f"{path}: timesteps {artifact.timesteps}{skips}, {fitness} {artifact.fitness.value:.4g} "
               f"({artifact.search.evaluations} candidates, {artifact.search.wall_time_s:.0f} s)")
