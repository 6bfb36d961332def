"""``accel-diffusion bench pareto``: sweep a model's strategies on this device into a Pareto profile."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from accel_diffusion.errors import AccelDiffusionError, InvalidRequestError


def _int_list(value: str, field: str) -> list[int]:
    try:
        steps = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InvalidRequestError(field, f"must be comma-separated integers, got {value!r}") from None
    if not steps or min(steps) < 1:
        raise InvalidRequestError(field, f"must list step counts >= 1, got {value!r}")
    return steps


def _students(values: tuple[str, ...]) -> list[tuple[str, list[int]]]:
    """``--student NAME[:STEPS,...]`` (default: 1 step)."""
    out = []
    for value in values:
        name, _, steps = value.partition(":")
        out.append((name, _int_list(steps, "student") if steps else [1]))
    return out


@click.group("bench")
def bench_command() -> None:
    """Measure this device: the quality–latency Pareto front of a model."""


@bench_command.command("pareto")
@click.option("--model", "-m", default="shapes", show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True,
              help="profile JSON (read back to resume); <model>@<device>.json in a profiles_dir serves it")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="stop after this much wall time (the profile says it is incomplete; rerun to continue)")
@click.option("--steps", "steps_list", default=None,
              help="step counts swept for every strategy family [default: 1,2,3,4,5,6,8,10,12,16,20,25,35,50; an "
              "autoregressive model: its constant head's 5,10,20,50]")
@click.option("--ar-iterations", "ar_iterations_list", default=None,
              help="autoregressive models: the AR iteration counts swept [default: 2,4,8,16]")
@click.option("--student", "students", multiple=True, help="a student model of MODEL, NAME[:STEPS,...] (repeatable)")
@click.option("--no-searched", is_flag=True, help="leave out the model's searched schedules")
@click.option("--images", type=click.IntRange(1, 196), default=196, show_default=True,
              help="prompts the quality is measured on (image k: the k-th combination, seed + k)")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="the larger batch whose per-image latency is also measured")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--latency-margin", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="relative latency difference treated as noise")
@click.option("--quality-margin", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="quality difference treated as noise (also the plateau threshold)")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, help="also write the PNG plot")
@click.option("--remeasure", "remeasure", multiple=True,
              help="measure every point of this model again (e.g. a retrained student) when resuming (repeatable)")
@click.option("--engine-acceleration", type=click.Choice(["none", "compile"]), default="none", show_default=True,
              help="the engine whose latency is measured: compile builds every measured shape's graphs before "
              "timing it (quality is measured eagerly either way); name OUT <model>@<device>+compile.json")
@click.option("--compile-buckets", default="1,2,4,8", show_default=True,
              help="with --engine-acceleration compile: the engine's row buckets, as the server's compile_buckets")
@click.option("--quality-from", "quality_from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="an eager profile of the same model, device, prompts and software: its points' quality is "
              "copied instead of measured again (each model's first such point is re-measured as a check)")
@click.option("--near-front", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="with --quality-from: measure only the anchors and the donor's points that no front point at "
              "least as good beats by more than this fraction of latency (the rest: skipped, with the reason)")
@click.pass_context
def pareto_command(ctx: click.Context, model: str, out_file: str, budget_minutes: float | None,
                   steps_list: str | None, ar_iterations_list: str | None,
                   students: tuple[str, ...], no_searched: bool, images: int, batch_size: int, repeats: int,
                   seed: int, latency_margin: float, quality_margin: float, plot_file: str | None,
                   remeasure: tuple[str, ...], engine_acceleration: str, compile_buckets: str,
                   quality_from: str | None, near_front: float | None) -> None:
    """Sweep MODEL's strategies (samplers x steps x schedules, searched schedules, guidance, students) on this
    device: quality with the eval sticks, latency warm; write every point and the front to OUT."""
    try:
        if near_front is not None and quality_from is None:
            raise InvalidRequestError("near_front", "needs --quality-from (the eager profile whose front to stay near)")
        buckets = _int_list(compile_buckets, "compile_buckets") if engine_acceleration == "compile" else None
        _pareto(ctx, model, Path(out_file), budget_minutes, steps_list, students, no_searched, images, batch_size,
                repeats, seed, latency_margin, quality_margin, plot_file, remeasure, engine_acceleration, buckets,
                Path(quality_from) if quality_from else None, near_front, ar_iterations_list)
    except AccelDiffusionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _pareto(ctx: click.Context, model: str, out: Path, budget_minutes: float | None, steps_list: str | None,
            students: tuple[str, ...], no_searched: bool, images: int, batch_size: int, repeats: int, seed: int,
            latency_margin: float, quality_margin: float, plot_file: str | None,
            remeasure: tuple[str, ...] = (), engine_acceleration: str = "none", buckets: list[int] | None = None,
            quality_from: Path | None = None, near_front_fraction: float | None = None,
            ar_iterations_list: str | None = None) -> None:
    from accel_diffusion.engine import Engine
    from accel_diffusion.models.registry import ModelRegistry
    from accel_diffusion.pareto.front import Margins
    from accel_diffusion.pareto.plot import plot_profile
    from accel_diffusion.pareto.profile import ParetoProfile, ProfileError
    from accel_diffusion.pareto.sweep import (
        DEFAULT_STEPS,
        ShapesMeter,
        anchor_candidates,
        candidates_for,
        default_families,
        mar_candidates,
        near_front,
        new_profile,
        open_profile,
        reusable_quality,
        searched_candidates,
        sweep,
    )

    registry = ModelRegistry.from_file((ctx.obj or {}).get("models_file"))
    spec = registry.spec(model)
    student_steps = _students(students)
    for name, _ in student_steps:
        registry.spec(name)  # an unknown student: the registry's error, naming it
    loaded = registry.get(model)
    autoregressive = loaded.family == "mar"
    if loaded.family not in ("sd", "sdxl", "mar"):
        raise InvalidRequestError("model", f"{model!r} is a {loaded.family} model; bench pareto measures text-to-image "
                                  "models (the gmm error-vs-NFE front: benchmarks/pareto.py)")
    if autoregressive and engine_acceleration != "none":
        raise InvalidRequestError("engine_acceleration", f"{model!r} is autoregressive: every engine runs its AR loop "
                                  "eagerly, so its eager profile serves compiling engines too; leave "
                                  "--engine-acceleration out")
    if ar_iterations_list is not None and not autoregressive:
        raise InvalidRequestError("ar_iterations", f"{model!r} is not autoregressive: leave --ar-iterations out")
    if autoregressive and (student_steps or quality_from is not None):
        raise InvalidRequestError("student" if student_steps else "quality_from",
                                  f"{model!r} is autoregressive: its sweep has no students and nothing to reuse")
    eager = Engine(registry)
    engine = Engine(registry, acceleration=engine_acceleration, buckets=buckets)  # type: ignore[arg-type]
    meter = ShapesMeter(engine, model, images=images, seed=seed, batch_size=batch_size, repeats=repeats,
                        quality_engine=eager)
    width, height = loaded.default_size
    margins = Margins(latency=latency_margin, quality=quality_margin)
    command = shlex.join(["accel-diffusion", *sys.argv[1:]])
    profile = open_profile(out, new_profile(model, loaded.device, meter, width=width, height=height, seed=seed,
                                            margins=margins, command=command, engine_acceleration=engine_acceleration,
                                            compile_buckets=buckets))
    if out.name != profile.file_name:
        click.echo(f"note: `strategy: auto` looks this profile up as {profile.file_name} in a profiles_dir", err=True)
    for name in remeasure:
        profile.forget(name)
    donor = None
    if quality_from is not None:
        try:
            donor = ParetoProfile.load(quality_from)
        except ProfileError as exc:
            raise InvalidRequestError("quality_from", str(exc)) from None
        meter.reuse, profile.quality_reused_from = reusable_quality(donor, profile, exclude=remeasure)
    default_strategy = spec.default_strategy.model_dump(exclude_none=True)
    default_ar_iterations = None
    if autoregressive:  # AR iterations x head steps (constant, DiSA); the anchor: the model's own default
        default_ar_iterations = int(loaded.pipeline.config["default_ar_iterations"])
        anchors = [c for _, c in anchor_candidates(model, default_strategy, spec.default_steps, default_ar_iterations)]
        sweep_steps = {}
        if steps_list is not None:
            sweep_steps["constant_steps"] = _int_list(steps_list, "steps")
        if ar_iterations_list is not None:
            sweep_steps["ar_iterations"] = _int_list(ar_iterations_list, "ar_iterations")
        keys = {c.key() for c in anchors}
        candidates = anchors + [c for c in mar_candidates(model, default_strategy, **sweep_steps)
                                if c.key() not in keys]
    else:
        guidance = spec.default_strategy.guidance or {"name": "cfg", "scale": 5.0}
        families = default_families(float(guidance.get("scale", 5.0)))
        anchors = [c for _, c in anchor_candidates(model, default_strategy, spec.default_steps)]
        steps = _int_list(steps_list, "steps") if steps_list is not None else list(DEFAULT_STEPS)
        candidates = candidates_for(model, families, steps, student_steps,
                                    [] if no_searched else searched_candidates(model), anchors)
    if donor is not None and near_front_fraction is not None:
        keep = near_front(donor, near_front_fraction)
        settled = {p.key() for p in profile.points} | {k["key"] for k in profile.skipped}
        profile.skipped += [{"key": c.key(), "reason": f"far from the eager front of {donor.file_name} "
                             f"(--near-front {near_front_fraction})"}
                            for c in candidates if not c.anchor and c.key() not in keep | settled]
    profile = sweep(profile, candidates, meter, out, budget_s=budget_minutes * 60 if budget_minutes else None)
    click.echo(f"{len(profile.points)} points, {len(profile.front)} on the front, {len(profile.skipped)} pruned; "
               f"{'complete' if profile.complete else 'incomplete (rerun to continue)'}; wrote {out}", err=True)
    if plot_file:
        plot_profile(profile, plot_file, default_strategy, spec.default_steps,
                     default_ar_iterations=default_ar_iterations)
        click.echo(f"wrote {plot_file}", err=True)
