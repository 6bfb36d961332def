"""The shapes evaluation: FD-shapes behaves as a distance, and the shipped model meets its bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.eval.frechet import frechet_distance
from accel_diffusion.eval.shapes_eval import JudgeFeatures, real_renders, shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.models.shapes.render import render_dataset


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    return ShapesJudge.load()


def test_prompts_cover_every_combination() -> None:
    prompts = shapes_prompts(2)
    assert len(prompts) == 392 and len(set(prompts)) == 196
    assert "an orange circle on a black background" in prompts


def test_fd_shapes_separates_real_from_degraded(judge: ShapesJudge) -> None:
    features = JudgeFeatures(judge)
    assert features.num_features == 128
    real = real_renders(1000)
    other_real = render_dataset(1000, seed=7)[0]
    grey = (0.5 * other_real + 0.5 * 128).astype(np.uint8)  # washed-out colours
    noisy = np.clip(other_real + np.random.default_rng(0).normal(0, 40, other_real.shape), 0, 255).astype(np.uint8)
    fd_real = frechet_distance(real, other_real, features)
    fd_grey = frechet_distance(real, grey, features)
    fd_noisy = frechet_distance(real, noisy, features)
    assert fd_real < 0.1 * min(fd_grey, fd_noisy)


def test_shipped_shapes_model_meets_the_bar() -> None:
    """The acceptance bar: 25 DPM-Solver++ steps, CFG 5, all 196 combinations, >= 95% all-right."""
    result = CliRunner().invoke(main, ["eval", "--model", "shapes", "--steps", "25", "--guidance-scale", "5"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 196 and metrics["steps"] == 25 and metrics["nfe_per_image"] == 50
    assert metrics["strategy"]["sampler"]["name"] == "dpmpp_2m"
    assert metrics["prompt_accuracy"]["all"] >= 0.95
    assert metrics["saturation"]["clipped_fraction"] < 0.05
    # FD-shapes: well above real-vs-real (the "blurry toy" look), and no worse than twice the recorded 864
    assert metrics["frechet_distance_real_baseline"] < 100 < metrics["frechet_distance"] < 1800
