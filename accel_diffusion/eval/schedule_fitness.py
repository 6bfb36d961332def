"""How good a candidate timestep sequence is on `shapes`: the fitness of an AutoDiffusion search.

Every candidate is run through the engine on the same fixed prompts and seeds (image k: seed + k), so
candidates are compared on the same samples and the same initial noise. Three measurements, all
with the project's own eval code:

- ``paired_distance``: mean per-image RMS pixel distance (0-1 scale) to the teacher's image from the
  same noise and prompt, the teacher being the same sampler and guidance at ``teacher_steps`` steps;
- ``teacher_fd``: Fréchet distance to the teacher's images in the shapes judge's feature space;
- ``prompt_accuracy``: the judge's prompt accuracy (as a fitness: 1 - accuracy, lower is better).

A fitness is ``ShapesScheduleFitness(...)`` called on a candidate: lower is better.

Held-out protocol: the 196 shapes prompts are split once, by a fixed seed, into 98 *search* prompts
(the only ones a search scores candidates on, with seeds below ``HELD_OUT_SEED``) and 98 *held-out*
prompts (``held_out_prompts()``, generated with seeds from ``HELD_OUT_SEED``, never searched on): a
searched schedule is judged on prompts and noise it never saw.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from accel_diffusion.eval.frechet import frechet_distance
from accel_diffusion.eval.image_stats import paired_distance, saturation_stats
from accel_diffusion.eval.shapes_eval import JudgeFeatures, shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.strategy import GenerationRequest

if TYPE_CHECKING:
    from accel_diffusion.engine.block_skip import SkipMode

FitnessKind = Literal["paired_distance", "teacher_fd", "prompt_accuracy"]
FITNESS_KINDS: tuple[str, ...] = ("paired_distance", "teacher_fd", "prompt_accuracy")


SPLIT_SEED = 20_261_205
HELD_OUT_SEED = 1_000_000  # held-out image k has seed HELD_OUT_SEED + k


def _split() -> tuple[list[str], list[str]]:
    prompts = shapes_prompts()
    order = random.Random(SPLIT_SEED).sample(range(len(prompts)), len(prompts))
    half = len(prompts) // 2
    return [prompts[i] for i in sorted(order[:half])], [prompts[i] for i in sorted(order[half:])]


def search_prompts() -> list[str]:
    """The 98 prompts a search may score candidates on (in shapes_prompts order)."""
    return _split()[0]


def held_out_prompts() -> list[str]:
    """The 98 prompts no search ever sees: the benchmark's (in shapes_prompts order)."""
    return _split()[1]


def fitness_prompts(count: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct prompts drawn by ``seed`` from the search prompts, none of ``exclude``."""
    pool = [p for p in search_prompts() if p not in set(exclude)]
    if not 1 <= count <= len(pool):
        raise ValueError(f"count must be between 1 and {len(pool)} (the prompts left), got {count}")
    return random.Random(seed).sample(pool, count)


class ShapesScheduleFitness:
    """Scores timestep sequences for one model, sampler and guidance on fixed prompts and seeds."""

    def __init__(
        self,
        engine: Any,
        *,
        sampler: dict[str, Any],
        guidance: dict[str, Any],
        kind: FitnessKind = "prompt_accuracy",
        model: str = "shapes",
        prompts: Sequence[str] | None = None,
        images: int = 49,
        seed: int = 0,
        teacher_steps: int = 50,
        judge: ShapesJudge | None = None,
        batch_size: int = 49,
        min_accuracy: float | None = None,
    ) -> None:
        if kind not in FITNESS_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FITNESS_KINDS)}, got {kind!r}")
        if min_accuracy is not None and (kind != "paired_distance" or not 0.0 < min_accuracy <= 1.0):
            raise ValueError(f"min_accuracy must be in (0, 1] with kind 'paired_distance', got {min_accuracy} with "
                             f"{kind!r}")
        self.min_accuracy = min_accuracy
        self.engine = engine
        self.model = model
        self.sampler = dict(sampler)
        self.guidance = dict(guidance)
        self.kind = kind
        self.prompts = list(prompts) if prompts is not None else fitness_prompts(images, seed)
        self.seed = seed
        self.teacher_steps = teacher_steps
        self.judge = judge or ShapesJudge.load()
        self.batch_size = batch_size
        self._teacher: np.ndarray | None = None
        self.unet_evaluations = 0  # per image, summed over every run (teacher included)

    def generate(self, schedule: dict[str, Any], steps: int | None = None,
                 model_context: Callable[[], AbstractContextManager[Any]] | None = None) -> np.ndarray:
        """uint8 images, one per prompt (image k with seed + k), through the engine; ``model_context`` (if
        given) makes a context entered around each generation (e.g. a block-skip hook, its cache per generation)."""
        out = []
        for start in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[start:start + self.batch_size]
            request = GenerationRequest.create(
                model=self.model, prompt=chunk, seed=self.seed + start, steps=steps,
                strategy={"sampler": self.sampler, "schedule": schedule, "guidance": self.guidance})
            with model_context() if model_context is not None else contextlib.nullcontext():
                result = self.engine.generate(request)
            self.unet_evaluations += result.nfe * len(chunk)
            out.append(result.to_uint8())
        return np.concatenate(out)

    def teacher(self) -> np.ndarray:
        if self._teacher is None:
            self._teacher = self.generate({"name": "spacing"}, self.teacher_steps)
        return self._teacher

    def candidate_images(self, timesteps: Sequence[int],
                         model_context: Callable[[], AbstractContextManager[Any]] | None = None) -> np.ndarray:
        return self.generate({"name": "timesteps", "timesteps": [int(t) for t in timesteps]},
                             model_context=model_context)

    def measure(self, images: np.ndarray) -> dict[str, float]:
        """Every measurement of ``images`` (one per prompt, from the fitness's seeds)."""
        teacher = self.teacher()
        return {
            "paired_distance": paired_distance(images, teacher),
            "teacher_fd": frechet_distance(teacher, images, JudgeFeatures(self.judge)),
            "prompt_accuracy": self.judge.prompt_accuracy(images, self.prompts)["all"],
            "out_of_gamut": saturation_stats(images)["clipped_fraction"],
        }

    def scores(self, timesteps: Sequence[int]) -> dict[str, float]:
        return self.measure(self.candidate_images(timesteps))

    def value(self, scores: dict[str, float]) -> float:
        """The fitness (lower is better) of a ``scores`` dict."""
        return 1.0 - scores["prompt_accuracy"] if self.kind == "prompt_accuracy" else scores[self.kind]

    def plan_images(self, timesteps: Sequence[int], skipped: Sequence[Sequence[str]],
                    mode: SkipMode | Mapping[str, SkipMode] = "drop") -> np.ndarray:
        """The images of ``timesteps`` with the UNet skipping ``skipped[k]`` (block names) at step k, dropped or
        reused (``mode``, or per block: a fresh block cache for every generation, as the engine's searched
        schedule has)."""
        from accel_diffusion.engine.block_skip import BlockSkip

        unet = self.engine.models.get(self.model).pipeline.unet
        plan = dict(zip((int(t) for t in timesteps), skipped, strict=True))
        return self.candidate_images(timesteps, model_context=lambda: BlockSkip(unet, plan, mode=mode))

    def __call__(self, timesteps: Sequence[int]) -> float:
        return self.fitness_of(self.candidate_images(timesteps))

    @property
    def label(self) -> str:
        """What the fitness minimises, as an artifact records it."""
        return self.kind if self.min_accuracy is None else f"{self.kind}@prompt_accuracy>={self.min_accuracy:g}"

    def fitness_of(self, images: np.ndarray) -> float:
        """The fitness (lower is better) of ``images``, one per prompt. With ``min_accuracy`` prompt accuracy is a
        constraint: images below it score 1 + the accuracy they lack, behind every image set that meets it (a
        paired distance is below 1; FD values are not, so the constraint is for ``paired_distance``)."""
        if self.min_accuracy is not None:
            accuracy = self.judge.prompt_accuracy(images, self.prompts)["all"]
            if accuracy < self.min_accuracy:
                return 1.0 + self.min_accuracy - accuracy
        if self.kind == "paired_distance":  # the cheap one: no judge features needed
            return paired_distance(images, self.teacher())
        if self.kind == "prompt_accuracy":  # the judge's verdicts only: no teacher, no features
            return 1.0 - self.judge.prompt_accuracy(images, self.prompts)["all"]
        return self.value(self.measure(images))


class SkipPlanFitness:
    """Stage 2's fitness: a skip plan (per step, indices into ``blocks``) scored with ``timesteps`` fixed, by
    ``fitness`` (its kind, prompts, seeds and teacher), the skipped blocks dropped or reused as ``mode`` (or, a
    mapping, each block's own mode) says.
    The plan covers the steps from ``from_step`` on (the steps before run every block: a reuse mode's first step
    fills its cache)."""

    def __init__(self, fitness: ShapesScheduleFitness, timesteps: Sequence[int], blocks: Sequence[str],
                 mode: SkipMode | Mapping[str, SkipMode] = "drop", from_step: int = 0) -> None:
        self.fitness = fitness
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = list(blocks)
        self.mode = mode
        self.from_step = from_step

    def names(self, plan: Sequence[Sequence[int]]) -> list[list[str]]:
        """The block names skipped at every step (the artifact's ``skipped_blocks``)."""
        return [[] for _ in range(self.from_step)] + [[self.blocks[i] for i in step] for step in plan]

    def __call__(self, plan: Sequence[Sequence[int]]) -> float:
        return self.fitness.fitness_of(self.fitness.plan_images(self.timesteps, self.names(plan), self.mode))
