"""``accel-diffusion bench pareto``: measure a model's strategy space on this device and keep the front.

Candidates are *families* (model, sampler, schedule, guidance) times step counts, plus the model's
searched schedules (each at its own step count) and its students (at the steps they were trained for).
Each candidate's latency is measured first (cheap: warm, median of repeats, batch 1 and one larger
batch, decode included), then its quality with the eval sticks on fixed prompts and seeds (prompt
accuracy, out-of-gamut %, paired distance to the model's reference output from the same noise).

The order and the pruning are what make a short budget useful instead of a truncated grid:

- round-robin over families by increasing step count, so every family is covered at its cheap end
  first (where ``auto`` matters most) before any family gets its expensive end;
- **dominated region**: a candidate whose measured latency is already beaten (by more than the latency
  margin) by a point whose quality is at the ceiling (e.g. accuracy 1.0, within the quality margin)
  cannot be on the front: its quality is not measured;
- **plateau**: when a family's quality has not risen by more than the quality margin over its last two
  step counts, its larger step counts (slower, no better) are skipped;
- the wall-time budget: past it the sweep stops, and the profile says it is incomplete.

The profile is written after every point, so a killed sweep resumes where it stopped (``--out`` is read
back; measured and skipped candidates are not measured again). Seeded: the same prompts and seeds each
run, and the same candidates in the same order.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from accel_diffusion.pareto.front import Margins
from accel_diffusion.pareto.profile import (
    ParetoPoint,
    ParetoProfile,
    configuration_key,
    device_key,
    hardware_info,
    request_fields,
    software_versions,
)
from accel_diffusion.strategy import GenerationRequest, Strategy

DEFAULT_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 35, 50)
LATENCY_PROMPT = "a red circle on a blue background"
REUSE_TOLERANCE = 1e-6  # a reused point's metrics, measured again on the same machine and software: the same images


ANCHORS: list[tuple[str, dict[str, Any], int]] = [
    # (label, strategy, steps): what a diffusers user runs by default (StableDiffusionPipeline's guidance 7.5)
    ("diffusers default: DPM-Solver++ 25, CFG 7.5",
     {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 7.5}}, 25),
    ("DDIM 50, CFG 7.5",
     {"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 7.5}}, 50),
]


@dataclass(frozen=True)
class Candidate:
    """One configuration to measure; ``family`` groups the step counts of one (model, strategy, AR iterations).
    An ``anchor`` (a reference setting the plot marks) is always measured, never pruned. ``ar_iterations``: an
    autoregressive model's AR iterations (None: not AR)."""

    model: str
    strategy: dict[str, Any]
    steps: int
    anchor: bool = field(default=False, compare=False)
    ar_iterations: int | None = None

    @property
    def family(self) -> str:
        """The key of this configuration at every step count (the sweep's plateau detection groups by it)."""
        return configuration_key(self.model, self.strategy, None, self.ar_iterations)

    def key(self) -> str:
        return configuration_key(self.model, self.strategy, self.steps, self.ar_iterations)

    def request(self, prompt: str | list[str], seed: int) -> GenerationRequest:
        """The request that generates this configuration's images (``pareto.profile.request_fields``)."""
        return GenerationRequest.create(model=self.model, prompt=prompt, seed=seed, strategy=self.strategy or None,
                                        **request_fields(self.strategy, self.steps, self.ar_iterations))


def default_families(guidance_scale: float = 5.0) -> list[dict[str, Any]]:
    """The strategy families swept for a text-to-image model: diffusers' samplers, ours, with and without CFG."""
    cfg = {"name": "cfg", "scale": guidance_scale}
    return [
        {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": cfg},
        {"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": cfg},
        {"sampler": {"name": "ddim"}, "schedule": {"name": "spacing", "spacing": "trailing"}, "guidance": cfg},
        {"sampler": {"name": "unipc"}, "schedule": {"name": "spacing"}, "guidance": cfg},
        {"sampler": {"name": "euler"}, "schedule": {"name": "spacing"}, "guidance": cfg},
        {"sampler": {"name": "hb", "beta": 0.8}, "schedule": {"name": "spacing"}, "guidance": cfg},
        {"sampler": {"name": "ghvb", "order": 0.8}, "schedule": {"name": "karras", "rho": 3.0}, "guidance": cfg},
        {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 3.0}},
        {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "none"}},
    ]


def searched_candidates(model: str) -> list[Candidate]:
    """Every shipped or configured searched schedule of ``model``, at the step count it was searched for."""
    from accel_diffusion.schedules.searched import list_artifacts

    out = []
    for artifact in list_artifacts():
        if artifact.model != model:
            continue
        strategy = {"sampler": artifact.sampler, "schedule": {"name": "searched", "id": artifact.id},
                    "guidance": artifact.guidance}
        out.append(Candidate(model, strategy, artifact.steps))
    return out


def normalized(strategy: dict[str, Any]) -> dict[str, Any]:
    """A strategy as profiles store it: every component's parameters spelled out."""
    return Strategy.parse(strategy).model_dump(exclude_none=True)


def anchor_candidates(model: str, default_strategy: dict[str, Any] | None = None,
                      default_steps: int | None = None,
                      default_ar_iterations: int | None = None) -> list[tuple[str, Candidate]]:
    """The plot's reference settings as candidates: diffusers' defaults and the model's own default. An
    autoregressive model (``default_ar_iterations``: its default AR iterations) has only its own default: diffusers'
    samplers at their step counts are not settings of its head."""
    anchors = list(ANCHORS) if default_ar_iterations is None else []
    if default_strategy is not None and default_steps is not None:
        label = f"{model}'s default ({default_steps} steps" + (
            f", {default_ar_iterations} AR iterations)" if default_ar_iterations is not None else ")")
        anchors.append((label, default_strategy, default_steps))
    # diffusers' anchors are there only without AR iterations, so every anchor takes the model's (None or its default)
    return [(label, Candidate(model, normalized(strategy), steps, anchor=True, ar_iterations=default_ar_iterations))
            for label, strategy, steps in anchors]


# An autoregressive model (shapes_mar): the AR iterations x the diffusion head's steps, constant or DiSA-annealed
# (specs/samplers.md §5: linear 50 -> 5 recommended; DDPM head, 5-step floor). Its guidance is the model's own.
MAR_AR_ITERATIONS = (2, 4, 8, 16)
MAR_CONSTANT_STEPS = (5, 10, 20, 50)
MAR_DISA_UPPERS = (20, 50)
MAR_DISA_LOWER = 5


def mar_candidates(model: str, default_strategy: dict[str, Any], ar_iterations: Sequence[int] = MAR_AR_ITERATIONS,
                   constant_steps: Sequence[int] = MAR_CONSTANT_STEPS,
                   disa_uppers: Sequence[int] = MAR_DISA_UPPERS) -> list[Candidate]:
    """The sweep's candidates for an AR model, cheap first: per step count, every AR iteration count with the
    constant head, then DiSA linear from that upper down to 5 (a DiSA point's ``steps`` is its upper). The head's
    sampler and guidance are the model's default strategy's."""
    base = {k: default_strategy[k] for k in ("sampler", "guidance") if default_strategy.get(k)}
    constant = normalized({**base, "schedule": {"name": "spacing", "spacing": "model"}})
    out = []
    for steps in sorted(set(constant_steps) | set(disa_uppers)):
        for k in sorted(ar_iterations):
            if steps in constant_steps:
                out.append(Candidate(model, constant, steps, ar_iterations=k))
            if steps in disa_uppers and steps > MAR_DISA_LOWER:
                disa = normalized({**base, "schedule": {"name": "disa", "upper": steps, "lower": MAR_DISA_LOWER,
                                                        "kind": "linear"}})
                out.append(Candidate(model, disa, steps, ar_iterations=k))
    return out


def candidates_for(model: str, families: Sequence[dict[str, Any]], steps: Sequence[int],
                   students: Sequence[tuple[str, Sequence[int]]] = (),
                   searched: Sequence[Candidate] = (), anchors: Sequence[Candidate] = ()) -> list[Candidate]:
    """The sweep's candidates in measuring order: the anchors, the searched schedules and students (cheap,
    few) at the front of the queue, then round-robin over families by increasing steps (a family step
    count equal to an anchor is measured once, as the anchor)."""
    out = list(anchors) + list(searched)
    for student, student_steps in students:
        out += [Candidate(student, {}, s) for s in sorted(student_steps)]
    families = [normalized(f) for f in families]
    for s in sorted(set(steps)):
        out += [Candidate(model, family, s) for family in families]
    seen: set[str] = set()
    return [c for c in out if not (c.key() in seen or seen.add(c.key()))]


@dataclass
class Measured:
    latency_ms: float
    batch_latency_ms: float | None
    nfe: int
    quality: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    quality_reused: bool = False


class ShapesMeter:
    """Measures candidates of a `shapes`-family model through the engine.

    Quality: the judge's prompt accuracy on ``images`` fixed prompts (image k: the k-th of the 196
    combinations, seed ``seed + k``), the out-of-gamut fraction and the paired distance to the model's
    reference output (its default strategy at ``reference_steps``) from the same noise. Latency: per image,
    warm, median of ``repeats``, at batch 1 and at ``batch_size``.

    Latency is measured on ``engine``, quality on ``quality_engine`` (default: ``engine``). With a compiling
    ``engine`` (``bench pareto --engine-acceleration compile``) every graph a measured shape uses is built
    before its timing starts (``compiled.build_missing_now`` on the warm-up call; a graph built during the
    timed calls is an error), and quality is measured on an eager engine: the same images as the eager
    profile's (compile agrees with eager within 1e-3). ``reuse``: points (by configuration key) of an eager
    profile measured with this meter's prompts and seeds, whose quality is copied instead of measured again;
    each model's first such point is measured anyway and must agree with the donor (``REUSE_TOLERANCE``),
    which catches a model retrained since the donor was measured."""

    quality_metric = "prompt_accuracy"
    quality_description = ("judge prompt accuracy (shape, colour and background all right) over the 196 shapes "
                           "prompts, one seed each")
    quality_ceiling = 1.0

    def __init__(self, engine: Any, model: str, *, images: int = 196, seed: int = 0, batch_size: int = 16,
                 repeats: int = 5, reference_steps: int = 50, eval_batch: int = 49, quality_engine: Any = None,
                 reuse: dict[str, ParetoPoint] | None = None) -> None:
        from accel_diffusion.eval.shapes_eval import shapes_prompts
        from accel_diffusion.eval.shapes_judge import ShapesJudge

        self.engine = engine
        self.quality_engine = quality_engine if quality_engine is not None else engine
        self.reuse = dict(reuse or {})
        self._checked: set[str] = set()  # models whose first reusable point, measured again, matched the donor
        self.model = model
        every = shapes_prompts()
        # all 196 by default; fewer: a seeded sample spread over shapes, colours and backgrounds
        self.prompts = every if images >= len(every) else random.Random(seed).sample(every, images)
        self.seed = seed
        self.batch_size = batch_size
        self.repeats = repeats
        self.reference_steps = reference_steps
        self.eval_batch = eval_batch
        self.judge = ShapesJudge.load()
        self._reference: np.ndarray | None = None

    def _images(self, candidate: Candidate) -> np.ndarray:
        out = []
        for start in range(0, len(self.prompts), self.eval_batch):
            chunk = self.prompts[start:start + self.eval_batch]
            out.append(self.quality_engine.generate(candidate.request(chunk, self.seed + start)).to_uint8())
        return np.concatenate(out)

    def reference(self) -> np.ndarray:
        if self._reference is None:
            self._reference = self._images(Candidate(self.model, {}, self.reference_steps))
        return self._reference

    def _timed(self, candidate: Candidate, batch: int) -> tuple[float, int]:
        request = candidate.request([LATENCY_PROMPT] * batch, self.seed)
        compiling = getattr(self.engine, "acceleration", "none") == "compile"
        if compiling:
            from accel_diffusion.engine.compiled import build_missing_now

            with build_missing_now():  # every graph of this shape built now, before any timing
                result = self.engine.generate(request)
            built = self._graphs_built(candidate.model)
        result = self.engine.generate(request)  # warm-up: first call of this shape (compiled: the graphs' first run)
        times = []
        for _ in range(self.repeats if batch == 1 else max(1, self.repeats // 2)):
            begin = time.perf_counter()
            self.engine.generate(request)
            times.append(time.perf_counter() - begin)
        if compiling:
            from accel_diffusion.engine.compiled import BUILDER

            BUILDER.wait()  # a build a timed call asked for (a shape the warm-up did not build) is counted too
            if self._graphs_built(candidate.model) != built:
                raise RuntimeError(f"a graph of {candidate.key()} at batch {batch} was built while it was timed")
        return statistics.median(times) * 1000.0 / batch, result.nfe

    def _graphs_built(self, model: str) -> int:
        compiled = self.engine.models.get(model).compiled_model()
        return sum(len(call.stats.builds) for call in compiled.calls())

    def latency(self, candidate: Candidate) -> Measured:
        single, nfe = self._timed(candidate, 1)
        batched = self._timed(candidate, self.batch_size)[0] if self.batch_size > 1 else None
        return Measured(single, batched, nfe)

    def quality(self, candidate: Candidate, measured: Measured) -> None:
        from accel_diffusion.eval.image_stats import paired_distance, saturation_stats

        donor = self.reuse.get(candidate.key())
        if donor is not None and candidate.model in self._checked:
            # the same configuration, prompts and seeds, measured eagerly in the donor profile
            measured.metrics = dict(donor.metrics)
            measured.quality = donor.quality
            measured.quality_reused = True
            return
        images = self._images(candidate)
        accuracy = self.judge.prompt_accuracy(images, self.prompts)
        measured.metrics = {
            "prompt_accuracy": float(accuracy["all"]),
            "out_of_gamut": float(saturation_stats(images)["clipped_fraction"]),
            "paired_distance": paired_distance(images, self.reference()),
        }
        measured.quality = measured.metrics["prompt_accuracy"]
        if donor is not None:  # a model's first reusable point is measured again: the donor's images must be these
            differ = {k: (v, measured.metrics.get(k)) for k, v in donor.metrics.items()
                      if measured.metrics.get(k) is None or abs(v - measured.metrics[k]) > REUSE_TOLERANCE}
            if differ:
                raise ValueError(f"--quality-from: {candidate.key()} measured again gives other metrics than the "
                                 f"donor profile ({differ}): {candidate.model!r} is not the model the donor measured "
                                 f"(retrained?); pass --remeasure {candidate.model} or leave --quality-from out")
            self._checked.add(candidate.model)


def _plateaued(history: list[float], margin: float) -> bool:
    """The last two step counts raised quality by no more than ``margin`` each."""
    return len(history) >= 3 and history[-1] <= history[-2] + margin and history[-2] <= history[-3] + margin


def sweep(profile: ParetoProfile, candidates: Sequence[Candidate], meter: Any, out: Path,
          budget_s: float | None = None, progress: bool = True,
          clock: Callable[[], float] = time.perf_counter) -> ParetoProfile:
    """Measure ``candidates`` into ``profile`` (already holding what an earlier run measured), pruning as the
    module says; saved to ``out`` after every candidate. Returns the profile (``complete`` when every
    candidate was measured or pruned)."""
    margins = profile.margins_obj()
    measured = {p.key() for p in profile.points}
    anchors = {c.key() for c in candidates if c.anchor}
    profile.skipped = [s for s in profile.skipped if s["key"] not in anchors - measured]  # an anchor is never pruned
    done = measured | {s["key"] for s in profile.skipped}
    history: dict[str, list[float]] = {}  # a family's qualities by increasing steps (anchors stay out of it)
    for point in sorted((p for p in profile.points if p.key() not in anchors), key=lambda p: p.steps):
        family = Candidate(point.model, point.strategy, point.steps, ar_iterations=point.ar_iterations).family
        history.setdefault(family, []).append(point.quality)
    plateaued = {fam for fam, qs in history.items() if _plateaued(qs, margins.quality)}
    begin = clock() - profile.wall_time_s
    todo = [c for c in candidates if c.key() not in done]
    ceiling = getattr(meter, "quality_ceiling", None)
    with tqdm(total=len(todo), desc="pareto", unit="pt", disable=not progress) as bar:
        for candidate in todo:
            if budget_s is not None and clock() - begin > budget_s:
                break
            reason = None
            if candidate.family in plateaued and not candidate.anchor:
                reason = "plateau: quality did not rise over the family's last two step counts"
            measured = None
            if reason is None:
                measured = meter.latency(candidate)
                if (ceiling is not None and not candidate.anchor
                        and _beaten_at_ceiling(profile, measured.latency_ms, ceiling, margins)):
                    reason = "dominated: a faster point already reaches the quality ceiling"
            if reason is not None:
                profile.skipped.append({"key": candidate.key(), "reason": reason})
            else:
                assert measured is not None
                meter.quality(candidate, measured)
                assert measured.quality is not None
                profile.add(ParetoPoint(model=candidate.model, strategy=candidate.strategy, steps=candidate.steps,
                                        quality=measured.quality, metrics=measured.metrics,
                                        latency_ms=measured.latency_ms, batch_latency_ms=measured.batch_latency_ms,
                                        nfe=measured.nfe, quality_reused=measured.quality_reused,
                                        ar_iterations=candidate.ar_iterations))
                if not candidate.anchor:
                    qs = history.setdefault(candidate.family, [])
                    qs.append(measured.quality)
                    if _plateaued(qs, margins.quality):
                        plateaued.add(candidate.family)
            profile.wall_time_s = clock() - begin
            profile.save(out)
            best = max((p.quality for p in profile.points), default=float("nan"))
            bar.set_postfix(points=len(profile.points), front=len(profile.front), best=f"{best:.3f}")
            bar.update(1)
    settled = {p.key() for p in profile.points} | {s["key"] for s in profile.skipped}
    remaining = [c for c in candidates if c.key() not in settled]
    profile.complete = not remaining
    profile.wall_time_s = clock() - begin
    profile.save(out)
    return profile


def _beaten_at_ceiling(profile: ParetoProfile, latency_ms: float, ceiling: float, margins: Margins) -> bool:
    return any(p.latency_ms < latency_ms * (1.0 - margins.latency) and p.quality >= ceiling - margins.quality
               for p in profile.points)


def new_profile(model: str, device: Any, meter: Any, *, width: int | None, height: int | None, seed: int,
                margins: Margins, command: str, engine_acceleration: str = "none",
                compile_buckets: list[int] | None = None) -> ParetoProfile:
    return ParetoProfile(model=model, device=device_key(device), engine_acceleration=engine_acceleration,
                         compile_buckets=compile_buckets, hardware=hardware_info(device),
                         versions=software_versions(), width=width, height=height,
                         quality_metric=meter.quality_metric, quality_description=meter.quality_description,
                         batch_size=meter.batch_size, seed=seed, samples=len(meter.prompts),
                         margins={"latency": margins.latency, "quality": margins.quality}, command=command)


def open_profile(out: Path, fresh: ParetoProfile) -> ParetoProfile:
    """The profile to continue: ``out`` when it is the same sweep (model, device, metric, seed, ...), else ``fresh``."""
    if not out.is_file():
        return fresh
    old = ParetoProfile.load(out)
    same = ("model", "device", "engine_acceleration", "compile_buckets", "quality_metric", "seed", "samples",
            "batch_size", "margins", "width", "height")
    mismatched = [k for k in same if getattr(old, k) != getattr(fresh, k)]
    if mismatched:
        raise ValueError(f"{out} is a profile of another sweep ({', '.join(mismatched)} differ): pass another --out "
                         "or delete it to start over")
    return old


def near_front(donor: ParetoProfile, fraction: float) -> set[str]:
    """Keys of ``donor``'s points near its front: no front point at least as good (within the quality margin)
    is more than ``fraction`` faster. Another engine (compiled) changes latencies by a similar factor, so a
    point further away cannot reach that engine's front unless its speed-up differs by more than that."""
    front = donor.front_points()
    margin = donor.margins_obj().quality
    return {p.key() for p in donor.points
            if not any(f.quality >= p.quality - margin and f.latency_ms < p.latency_ms * (1.0 - fraction)
                       for f in front)}


REUSE_SAME = ("model", "device", "quality_metric", "seed", "samples", "width", "height")


def reusable_quality(donor: ParetoProfile, fresh: ParetoProfile,
                     exclude: Sequence[str] = ()) -> tuple[dict[str, ParetoPoint], dict[str, Any]]:
    """The points of ``donor`` (an eager profile) whose quality a sweep making ``fresh`` may copy, by
    configuration key, and the ``quality_reused_from`` record that says so. The images are the same only
    for the same model, device, prompts (samples, seed), size and software: anything else is a ValueError
    naming what differs. Points of the models in ``exclude`` (re-measured: e.g. a retrained student) are
    not reused."""
    if donor.engine_acceleration != "none":
        raise ValueError(f"--quality-from: {donor.file_name} was measured with engine_acceleration "
                         f"{donor.engine_acceleration}; give the eager profile (its quality is measured eagerly)")
    mismatched = [k for k in REUSE_SAME if getattr(donor, k) != getattr(fresh, k)]
    versions = ("torch", "diffusers", "accel_diffusion")
    mismatched += [f"versions.{k}" for k in versions if donor.versions.get(k) != fresh.versions.get(k)]
    if mismatched:
        raise ValueError(f"--quality-from: {donor.file_name} is not the same measurement ({', '.join(mismatched)} "
                         "differ): its images are not this sweep's; measure quality again (leave --quality-from out)")
    points = {p.key(): p for p in donor.points if p.model not in exclude}
    record = {"profile": donor.file_name, "date": donor.date, "versions": dict(donor.versions), "points": len(points),
              "why": "quality is measured with the eager engine in both profiles, on the same prompts, seeds, model "
                     "weights and software: the same images (compile agrees with eager within 1e-3); only latency "
                     "is measured again. Checked: each model's first reusable point was measured again and agreed "
                     f"with the donor within {REUSE_TOLERANCE}"}
    return points, record
