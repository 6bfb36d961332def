"""The paired-distance fitness with prompt accuracy as a constraint (``min_accuracy``, ``--min-accuracy``): image sets
that meet it score their paired distance (below 1), those below it 1 + the accuracy they lack, behind every one that
meets it; only with the paired distance; the artifact records the constraint in its fitness kind."""

from __future__ import annotations

import numpy as np
import pytest

from accel_diffusion.eval.image_stats import paired_distance
from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.models.shapes.render import render_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def fitness(min_accuracy: float | None, prompts: list[str], teacher: np.ndarray) -> ShapesScheduleFitness:
    made = ShapesScheduleFitness(None, sampler={"name": "ddim"}, guidance={"name": "cfg", "scale": 5.0},
                                 kind="paired_distance", prompts=prompts, judge=ShapesJudge.load(),
                                 min_accuracy=min_accuracy)
    made._teacher = teacher
    return made


def test_accuracy_is_a_constraint_ranked_before_the_distance() -> None:
    renders, captions, _ = render_dataset(16, seed=5)
    judge = ShapesJudge.load()
    accuracy = judge.prompt_accuracy(renders, captions)["all"]
    assert accuracy >= 0.9  # the judge reads the renders it was trained on
    teacher = renders.copy()
    near = np.clip(renders.astype(np.int16) + 6, 0, 255).astype(np.uint8)  # close to the teacher, still readable
    wrong = renders[::-1].copy()  # every image another prompt's: far lower accuracy
    plain, constrained = fitness(None, captions, teacher), fitness(0.9, captions, teacher)
    assert constrained.label == "paired_distance@prompt_accuracy>=0.9" and plain.label == "paired_distance"
    near_accuracy = judge.prompt_accuracy(near, captions)["all"]
    wrong_accuracy = judge.prompt_accuracy(wrong, captions)["all"]
    assert near_accuracy >= 0.9 > wrong_accuracy
    assert constrained.fitness_of(near) == plain.fitness_of(near) == pytest.approx(paired_distance(near, teacher))
    assert constrained.fitness_of(wrong) == pytest.approx(1.0 + 0.9 - wrong_accuracy)
    assert plain.fitness_of(wrong) < 1.0 < constrained.fitness_of(wrong)
    with pytest.raises(ValueError, match="min_accuracy must be in"):
        ShapesScheduleFitness(None, sampler={"name": "ddim"}, guidance={"name": "none"}, kind="prompt_accuracy",
                              prompts=captions, judge=judge, min_accuracy=0.9)


def test_the_cli_takes_the_constraint_only_with_the_paired_distance(tmp_path) -> None:
    from click.testing import CliRunner

    from accel_diffusion.cli import main

    run = CliRunner().invoke(main, ["search", "--steps", "3", "--out", "x", "--dir", str(tmp_path),
                                    "--min-accuracy", "0.9"])
    assert run.exit_code == 2
    assert "min_accuracy: is a constraint on --fitness paired_distance, not prompt_accuracy" in run.output, run.output
