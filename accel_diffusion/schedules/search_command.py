"""``accel-diffusion search``: run the AutoDiffusion timestep search on a model and save its artifact.

The search (``autodiffusion.py``) proposes timestep sequences; each is scored through the engine by
``eval/schedule_fitness.py`` (no second denoising loop); the best is written as a searched-schedule
artifact that ``{"schedule": {"name": "searched", "id": ...}}`` then names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
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


def hand_made_grids(scheduler_config: dict[str, Any], sampler: dict[str, Any], space: SearchSpace,
                    schedules: tuple[dict[str, Any], ...] = HAND_MADE_GRIDS) -> list[tuple]:
    """The integer timesteps of every hand-made grid (of ``schedules``) the sampler builds at K steps (distinct,
    valid ones)."""
    grids = []
    for schedule_spec in schedules:
        try:
            grid = grid_timesteps(scheduler_config, sampler, schedule_spec, space)
        except (InvalidRequestError, ValueError, TypeError):
            continue
        if grid not in grids:
            grids.append(grid)
    return grids


def grid_timesteps(scheduler_config: dict[str, Any], sampler: dict[str, Any], schedule_spec: dict[str, Any],
                   space: SearchSpace) -> tuple[int, ...]:
    """The K integer timesteps the schedule ``schedule_spec`` gives the sampler; the error says why where it gives
    none (a schedule the sampler cannot take, repeated timesteps once rounded)."""
    import torch

    registry = get_registry()
    schedule = registry.build("schedule", schedule_spec)
    scheduler = registry.build("sampler", sampler).make_scheduler(scheduler_config, schedule.scheduler_options())
    schedule.check_compatible(scheduler, sampler["name"])
    schedule.set_timesteps(scheduler, space.num_steps, torch.device("cpu"))
    return space.check([round(float(t)) for t in scheduler.timesteps])


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
    probe_modes: tuple[str, ...] = ("drop", "residual"),
    min_accuracy: float | None = None,
    seed_timesteps: Sequence[str] = (),
) -> tuple[SearchedArtifact | None, Path | None, SearchResult | None]:
    """Search, save the artifact into ``schedules_dir`` and return (artifact, its path, the SearchResult of the
    last stage run); the artifact is None when the time budget ran out first (the state files keep the search
    for a resumed run).

    With ``skip_budget`` (a fraction of the full UNet's time, e.g. 0.8), stage 2 then searches which blocks
    to skip at which of the found timesteps (at most ``max_skip`` per step) so that the measured cost model
    (``measure_block_costs``) puts the plan at no more than that fraction of the UNet time. ``timesteps_from``
    names an artifact (same model, sampler, guidance and step count) whose timesteps stage 2 starts from,
    instead of running stage 1 again; its search cost is added to the new artifact's (or a schedule's JSON, e.g.
    ``{"name": "karras", "rho": 3}``: its K timesteps for this sampler). ``skip_mode`` is what a
    skipped block gives (``drop``: its skip connection; ``reuse``/``residual``: its output, or its residual, cached
    at the last step where it ran: the first step then runs every block; ``best``: each block in the mode of
    ``probe_modes`` that scores best when it alone is skipped) and ``skip_blocks`` limits the blocks
    stage 2 may skip (default: all of them). ``seed_timesteps`` are sequences stage 1's generation 0 starts from
    beside the uniform schedule and the hand-made grids (each a comma list, a schedule or artifact JSON, or the path
    of a JSON file holding one: ``seeded_sequences``); the artifact records them."""
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
    if seed_timesteps and timesteps_from is not None:
        raise InvalidRequestError("seed_timesteps", "--seed-timesteps seeds stage 1, which --timesteps-from skips: "
                                  "give one of them")
    loaded = engine.models.get(model)
    sampler_spec, guidance_spec = resolve_components(loaded.spec, sampler, guidance)
    scheduler_config = dict(loaded.scheduler_config)
    probe = get_registry().build("sampler", sampler_spec).make_scheduler(scheduler_config, {})
    ExplicitTimesteps([1]).check_compatible(probe, sampler_spec["name"])  # refuses samplers without timesteps=
    space = SearchSpace(steps, int(scheduler_config["num_train_timesteps"]))
    seeds = seeded_sequences(seed_timesteps, scheduler_config, sampler_spec, space)
    config = config or SearchConfig()
    folder = Path(schedules_dir or os.environ.get(SCHEDULES_DIR_ENV) or "schedules")
    folder.mkdir(parents=True, exist_ok=True)
    state = Path(state_path) if state_path is not None else folder / f"{schedule_id}.search-state"
    skip_state = folder / (f"{schedule_id}.skip-state" if skip_mode == "drop"
                           else f"{schedule_id}.{skip_mode}-skip-state")
    probe_state = skip_state.with_name(skip_state.name + ".probe")
    common = {"sampler": sampler_spec, "guidance": guidance_spec, "model": model, "seed": config.seed,
              "teacher_steps": teacher_steps, "min_accuracy": min_accuracy}
    cheap = ShapesScheduleFitness(engine, kind=fitness, images=images, **common)  # type: ignore[arg-type]
    costly = (ShapesScheduleFitness(engine, kind=fitness, images=rescore_images, judge=cheap.judge,
                                    **common)  # type: ignore[arg-type]
              if rescore_images > images and rescore_top > 0 else None)
    start = time.perf_counter()
    result: SearchResult | None = None
    if timesteps_from is not None and timesteps_from.lstrip().startswith("{"):
        timesteps = _grid_timesteps(timesteps_from, scheduler_config, sampler_spec, space, skip_budget)
        value, evaluations, wall_time_s = float("nan"), 0, 0.0
    elif timesteps_from is not None:
        timesteps, value, evaluations, wall_time_s = _stage_one_from(
            timesteps_from, folder, model, sampler_spec, guidance_spec, steps, skip_budget)
    else:
        result = EvolutionarySearch(space, cheap, config,
                                    grids=hand_made_grids(scheduler_config, sampler_spec, space), seeds=seeds,
                                    state_path=state,
                                    time_budget_s=time_budget_s, rescore=costly, rescore_top=rescore_top,
                                    progress=progress).run()
        if not result.finished:
            return None, None, result
        timesteps, value = result.best
        evaluations, wall_time_s = result.evaluations, result.wall_time_s
    skipped: list[list[str]] = [[] for _ in timesteps]
    unet_cost = None
    block_modes: dict[str, str] = {}
    if skip_budget is not None:
        left = None if time_budget_s is None else max(time_budget_s - (time.perf_counter() - start), 0.0)
        try:
            stage2, skipped, value, unet_cost, used = _skip_search(
                engine, model, cheap, costly, timesteps, skip_budget, max_skip, skip_config or config,
                skip_state, left, rescore_top, progress, skip_mode, skip_blocks, probe_modes)
        except _OutOfTime:
            return None, None, result
        if not stage2.finished:
            return None, None, stage2
        if skip_mode == "best":
            block_modes = used
        evaluations, wall_time_s, result = evaluations + stage2.evaluations, wall_time_s + stage2.wall_time_s, stage2
    artifact = SearchedArtifact(
        id=schedule_id, model=model, sampler=sampler_spec, guidance=guidance_spec, steps=steps,
        timesteps=list(timesteps), skipped_blocks=skipped, skip_mode="drop" if skip_mode == "best" else skip_mode,
        block_modes=block_modes,
        fitness=SearchFitness(kind=cheap.label, value=value, samples=len(costly.prompts) if costly else images),
        search=SearchCost(evaluations=evaluations, wall_time_s=max(wall_time_s, time.perf_counter() - start),
                          command=command, skip_budget=skip_budget, unet_cost=unet_cost,
                          seed_timesteps=[list(seed) for seed in seeds]),
        seed=config.seed,
    )
    path = artifact.save(folder)
    for done in (state, skip_state, probe_state):
        done.unlink(missing_ok=True)
    return artifact, path, result


def seeded_sequences(values: Sequence[str], scheduler_config: dict[str, Any], sampler: dict[str, Any],
                     space: SearchSpace) -> list[tuple[int, ...]]:
    """The K timesteps of each ``--seed-timesteps`` value: a comma list (``897,818,700,71``), a searched-schedule
    artifact (its timesteps), a schedule (those it gives the sampler at K steps, e.g. ``{"name": "karras", "rho": 3}``),
    as JSON or the path of a JSON file. Distinct ones, in the order given; an error naming the flag otherwise."""
    seeds: list[tuple[int, ...]] = []
    for value in values:
        seed = _seeded_sequence(value.strip(), scheduler_config, sampler, space)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _seeded_sequence(value: str, scheduler_config: dict[str, Any], sampler: dict[str, Any],
                     space: SearchSpace) -> tuple[int, ...]:
    from accel_diffusion.schedules.searched import ARTIFACT_FORMAT

    def refuse(reason: str) -> InvalidRequestError:
        return InvalidRequestError("seed_timesteps", f"--seed-timesteps {value!r}: {reason}")

    if re.fullmatch(r"[\d\s,-]+", value):
        if not re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*", value):
            raise refuse("is not a comma list of integers (e.g. 897,818,700,71)")
        try:
            return space.check([int(t) for t in value.split(",")])
        except ValueError as exc:
            raise refuse(f"{exc}: give {space.num_steps} distinct timesteps in 0 .. {space.num_train_timesteps - 1}, "
                         "comma-separated") from None
    text = value
    if not value.startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise refuse(f"is neither a comma list of {space.num_steps} timesteps nor a JSON file (no such file)")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise refuse(f"is not JSON: {exc}") from None
    if isinstance(data, list):
        data = {"name": "timesteps", "timesteps": data}
    if not isinstance(data, dict):
        raise refuse("give a comma list, a schedule or an artifact (a JSON object)")
    if data.get("format") == ARTIFACT_FORMAT:  # an artifact: its timesteps (any sampler's: only a starting point)
        data = {"name": "timesteps", "timesteps": data.get("timesteps")}
    if data.get("name") == "timesteps":
        try:
            return space.check(data.get("timesteps") or [])
        except (ValueError, TypeError) as exc:
            raise refuse(f"{exc}: give {space.num_steps} distinct timesteps in 0 .. "
                         f"{space.num_train_timesteps - 1}") from None
    try:
        return grid_timesteps(scheduler_config, sampler, data, space)
    except (InvalidRequestError, ValueError, TypeError) as exc:
        reason = exc.message if isinstance(exc, InvalidRequestError) else str(exc)
        raise refuse(f"gives {sampler['name']} no {space.num_steps} distinct timesteps: {reason}") from None


def _grid_timesteps(schedule_json: str, scheduler_config: dict[str, Any], sampler: dict[str, Any],
                    space: SearchSpace, skip_budget: float | None) -> tuple[int, ...]:
    """The K timesteps the schedule ``schedule_json`` gives the sampler (stage 2 starting from a hand-made grid)."""
    if skip_budget is None:
        raise InvalidRequestError("timesteps_from", "only stage 2 starts from given timesteps: give --skip-budget too")
    try:
        spec = json.loads(schedule_json)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("timesteps_from", f"is not JSON: {exc}") from None
    try:
        return grid_timesteps(scheduler_config, sampler, spec, space)
    except (InvalidRequestError, ValueError, TypeError) as exc:
        reason = exc.message if isinstance(exc, InvalidRequestError) else str(exc)
        raise InvalidRequestError("timesteps_from", f"the schedule {schedule_json} gives {sampler['name']} no "
                                  f"{space.num_steps} distinct timesteps: {reason}") from None


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


def block_cost_model(engine: Any, model: str, fitness: Any, with_skip_costs: bool = False) -> Any:
    """The UNet's skippable blocks and each one's measured share of a UNet call, at the batch the fitness runs
    (its prompts, cond and uncond) and the model's latent size; ``with_skip_costs``: and what skipping each one
    still costs, per mode (``measure_skip_costs``)."""
    import torch

    from accel_diffusion.engine.block_skip import measure_block_costs, measure_skip_costs, skippable_blocks

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
    def call() -> Any:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)

    shares = measure_block_costs(unet, call)
    if with_skip_costs:
        return skippable_blocks(unet), shares, measure_skip_costs(unet, call)
    return skippable_blocks(unet), shares


PROBE_MODES = ("drop", "residual")


def _skip_search(engine: Any, model: str, cheap: Any, costly: Any, timesteps: tuple[int, ...], skip_budget: float,
                 max_skip: int, config: SearchConfig, state: Path, time_budget_s: float | None, rescore_top: int,
                 progress: bool, mode: str = "drop", allowed: list[str] | None = None,
                 probe_modes: tuple[str, ...] = PROBE_MODES,
                 ) -> tuple[SearchResult, list[list[str]], float, float, dict[str, str]]:
    """Stage 2: (its SearchResult, the best plan's block names per step, its fitness, its modelled UNet cost
    as a fraction of the full UNet's, the mode of each skipped block). In a reuse mode the first step runs every
    block (its cache is filled there) and the plan covers the others. A skipped block saves its measured share
    less what its mode still computes (``measure_skip_costs``: the skip connection; in residual mode twice,
    and a subtraction and an addition).

    ``mode="best"``: each block is first skipped alone at every step but the first in each of ``probe_modes``
    (the probe, scored like the plans); it is then skipped in the mode that scored best, and generation 0 holds
    the greedy plans of the probe's best blocks (by score, and by score lost per time saved)."""
    import time as _time

    from accel_diffusion.eval.schedule_fitness import SkipPlanFitness
    from accel_diffusion.schedules.autodiffusion import SkipPlanSearch, SkipSpace, greedy_plan

    every, shares, skip_costs = block_cost_model(engine, model, cheap, with_skip_costs=True)
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
    started = _time.perf_counter()
    probe: dict[str, dict[str, float]] = {}
    if mode == "best":
        probe = _probe_blocks(cheap, timesteps, blocks, probe_modes, state.with_name(state.name + ".probe"), progress)
        modes = {b: min(probe[b], key=lambda m: (probe[b][m], probe_modes.index(m))) for b in blocks}
        if time_budget_s is not None and _time.perf_counter() - started >= time_budget_s:
            raise _OutOfTime
    else:
        modes = dict.fromkeys(blocks, mode)
    savings = tuple(max(shares[b] - skip_costs[b][modes[b]], 0.0) for b in blocks)
    rest = 1.0 - sum(savings)  # a full UNet call costs 1
    try:
        space = SkipSpace(K - first, len(blocks), skip_budget * K - first, min(max_skip, len(blocks)), savings, rest)
    except ValueError as exc:
        raise InvalidRequestError("skip_budget", f"{exc}: raise --skip-budget or --max-skip") from None
    seeds = []
    if probe:
        best = {i: probe[b][modes[b]] for i, b in enumerate(blocks)}
        floor = min(best.values())
        for key in (lambda i: (best[i], i), lambda i: ((best[i] - floor + 1e-3) / max(savings[i], 1e-9), i)):
            with contextlib.suppress(ValueError):
                plan = greedy_plan(space, sorted(best, key=key))
                if plan not in seeds:
                    seeds.append(plan)
    plan_fitness = SkipPlanFitness(cheap, timesteps, blocks, modes, first)  # type: ignore[arg-type]
    rescore = SkipPlanFitness(costly, timesteps, blocks, modes, first) if costly is not None else None  # type: ignore[arg-type]
    probe_s = _time.perf_counter() - started
    left = None if time_budget_s is None else max(time_budget_s - probe_s, 0.0)
    result = SkipPlanSearch(space, plan_fitness, config, seeds=seeds, state_path=state, time_budget_s=left,
                            rescore=rescore, rescore_top=rescore_top, progress=progress).run()
    result.wall_time_s += probe_s  # this run's probe (a resumed run's probe file holds the earlier ones' scores)
    result.evaluations += sum(len(scores) for scores in probe.values())  # the probe's plans are candidates scored
    plan, value = result.best if result.ranked else (space.skip_nothing(), float("nan"))
    names = plan_fitness.names(plan)
    used = {b: modes[b] for step in names for b in step}
    return result, names, value, (first + space.cost(plan)) / K, used


class _OutOfTime(Exception):
    """The time budget ran out in stage 2's probe (its scores are kept for the resumed run)."""


def _probe_blocks(fitness: Any, timesteps: tuple[int, ...], blocks: list[str], modes: tuple[str, ...], path: Path,
                  progress: bool) -> dict[str, dict[str, float]]:
    """Each block skipped alone at every step but the first, in each mode: its fitness (lower is better). Kept in
    ``path`` after every score, so an interrupted search resumes without scoring a block twice."""
    from tqdm.auto import tqdm

    from accel_diffusion.eval.schedule_fitness import SkipPlanFitness

    identity = {"timesteps": list(timesteps), "blocks": blocks, "modes": list(modes), "prompts": fitness.prompts,
                "kind": fitness.kind}
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    scores: dict[str, dict[str, float]] = saved.get("scores", {}) if saved.get("identity") == identity else {}
    todo = [(b, m) for b in blocks for m in modes if m not in scores.get(b, {})]
    for block, mode in tqdm(todo, desc="probe", disable=not progress, unit="plan"):
        plan = [[0] for _ in timesteps[1:]]
        value = SkipPlanFitness(fitness, timesteps, [block], mode, 1)(plan)  # type: ignore[arg-type]
        scores.setdefault(block, {})[mode] = float(value)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"identity": identity, "scores": scores}), encoding="utf-8")
        os.replace(tmp, path)
        if progress:
            tqdm.write(f"probe {block} {mode}: {value:.4g}", file=sys.stderr)
    return scores


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
@click.option("--min-accuracy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --fitness paired_distance: prompt accuracy is a constraint; a candidate below it ranks behind "
                   "every one that meets it (by the accuracy it lacks).")
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
@click.option("--skip-mode", type=click.Choice(["drop", "reuse", "residual", "best"]), default="drop",
              show_default=True,
              help="Stage 2: a skipped block gives its skip connection (drop), its output of the last step where it "
                   "ran (reuse, DeepCache-style), or its skip connection plus that step's residual (residual); best: "
                   "each block in the --probe-modes mode that scores best with it alone skipped (probed first).")
@click.option("--probe-modes", default="drop,residual", show_default=True,
              help="With --skip-mode best: the modes each block is probed in, comma-separated.")
@click.option("--skip-blocks", default=None,
              help="Stage 2: the blocks it may skip, comma-separated (default: every ResNet and attention block).")
@click.option("--timesteps-from", default=None,
              help="Stage 2 only: start from this artifact's timesteps (same model, sampler, guidance, steps), or a "
                   "schedule's, given as JSON (e.g. '{\"name\": \"karras\", \"rho\": 3}').")
@click.option("--seed-timesteps", multiple=True,
              help="Stage 1: start from this sequence too (repeatable): K comma-separated timesteps (e.g. "
                   "897,818,700,71), or an artifact's or a schedule's JSON, or a file holding one; recorded in the "
                   "artifact.")
@click.pass_context
def search_command(ctx: click.Context, model: str, steps: int, sampler: str | None, guidance: str | None,
                   guidance_scale: float | None, schedule_id: str, schedules_dir: str | None, fitness: str,
                   min_accuracy: float | None, images: int, rescore_images: int, teacher_steps: int, population: int,
                   epochs: int, select: int,
                   mutations: int, crossovers: int, mutation_prob: float, mutation_radius: int, seed: int,
                   time_budget_s: float | None, budget_minutes: float | None, skip_budget: float | None,
                   max_skip: int, skip_epochs: int | None, skip_mode: str, probe_modes: str, skip_blocks: str | None,
                   timesteps_from: str | None, seed_timesteps: tuple[str, ...]) -> None:
    """Search K timesteps for a model, sampler and guidance (AutoDiffusion stage 1), then, with --skip-budget,
    which UNet blocks to skip at which step (stage 2), and save the artifact."""
    if budget_minutes is not None:
        if time_budget_s is not None:
            raise InvalidRequestError("budget_minutes", "give --budget-minutes or --time-budget, not both")
        time_budget_s = 60.0 * budget_minutes
    from accel_diffusion.cli import _json_arg, _registry
    from accel_diffusion.engine import Engine
    from accel_diffusion.engine.block_skip import SKIP_MODES
    from accel_diffusion.strategy import merge_guidance_scale
    from accel_diffusion.third_party_output import quiet_third_party_output

    if min_accuracy is not None and fitness != "paired_distance":
        raise InvalidRequestError("min_accuracy", f"is a constraint on --fitness paired_distance, not {fitness}")
    probed = tuple(m.strip() for m in probe_modes.split(",") if m.strip())
    if not probed or any(m not in SKIP_MODES for m in probed):
        raise InvalidRequestError("probe_modes", f"{probe_modes!r}: give some of {', '.join(SKIP_MODES)}, "
                                  "comma-separated")
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
        else None, probe_modes=probed, min_accuracy=min_accuracy, seed_timesteps=seed_timesteps)
    if artifact is None and result is None:
        click.echo("time budget spent while probing the blocks (scores kept); run the same command again to continue",
                   err=True)
        sys.exit(3)
    if artifact is None:
        best = f" (best so far {result.ranked[0][1]:.4g})" if result.ranked else ""
        click.echo(f"time budget spent after {result.evaluations} candidates{best}; run the same command again "
                   "to continue", err=True)
        sys.exit(3)
    modes = artifact.block_modes or artifact.skip_mode
    skips = "" if artifact.search.unet_cost is None else (
        f", skipped blocks {artifact.skipped_blocks} ({modes}; UNet time x{artifact.search.unet_cost:.3f} "
        "by the cost model)")
    click.echo(f"{path}: timesteps {artifact.timesteps}{skips}, {fitness} {artifact.fitness.value:.4g} "
               f"({artifact.search.evaluations} candidates, {artifact.search.wall_time_s:.0f} s)")
