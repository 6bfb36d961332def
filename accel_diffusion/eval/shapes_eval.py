"""Evaluate a text-to-image model on every `shapes` prompt: the standard quality measurement.

One image per shape x colour x background combination (196, times ``repeats``), generated through
the engine, judged by the shipped classifier: prompt accuracy, Fréchet distance to real renders in
the judge's feature space (FD-shapes), saturation statistics, NFE and time per image.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from accel_diffusion.eval.frechet import frechet_distance
from accel_diffusion.eval.image_stats import saturation_stats
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.models.shapes.render import all_combinations, combination_prompt, render_dataset
from accel_diffusion.strategy import GenerationRequest, Strategy

REAL_RENDERS = 2000
REAL_RENDER_SEED = 20_261_123


class JudgeFeatures(nn.Module):
    """The judge's penultimate features as an ``nn.Module`` over uint8 NHWC tensors (for FD-shapes)."""

    def __init__(self, judge: ShapesJudge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = int(judge.features(np.zeros((1, 32, 32, 3), np.uint8)).shape[1])

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images_nhwc.numpy())


def shapes_prompts(repeats: int = 1) -> list[str]:
    return [combination_prompt(*combo) for _ in range(repeats) for combo in all_combinations()]


def real_renders(count: int = REAL_RENDERS) -> np.ndarray:
    return render_dataset(count, seed=REAL_RENDER_SEED)[0]


def evaluate_shapes(
    engine: Any,
    model: str = "shapes",
    strategy: Strategy | dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    repeats: int = 1,
    batch_size: int = 49,
    judge: ShapesJudge | None = None,
    real: np.ndarray | None = None,
    progress: bool = True,
    init_image: Any = None,
    strength: float = 0.8,
) -> dict[str, Any]:
    """Generate one image per prompt (seed + index) and measure it. Returns JSON-safe metrics.

    With ``init_image`` every image is img2img from it at ``strength`` (e.g. for RCFG self-negative).
    """
    judge = judge or ShapesJudge.load()
    prompts = shapes_prompts(repeats)
    parsed = Strategy.parse(strategy)
    images, nfe, seconds, resolved, used_steps = [], 0, 0.0, None, None
    with tqdm(total=len(prompts), desc="eval", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            request = GenerationRequest.create(model=model, prompt=chunk, seed=seed + start, steps=steps,
                                               strategy=parsed, init_image=init_image, strength=strength)
            begin = time.perf_counter()
            result = engine.generate(request)
            seconds += time.perf_counter() - begin
            images.append(result.to_uint8())
            nfe, resolved, used_steps = result.nfe, result.strategy, result.steps
            bar.update(len(chunk))
    generated = np.concatenate(images)
    real = real if real is not None else real_renders()
    features = JudgeFeatures(judge)
    # The same number of fresh real renders against the same reference: what FD reads for perfect samples.
    fresh_real = render_dataset(len(prompts), seed=REAL_RENDER_SEED + 1)[0]
    return {
        "model": model,
        "strategy": resolved.model_dump(exclude_none=True) if resolved else None,
        "steps": used_steps,
        "images": len(prompts),
        "prompt_accuracy": judge.prompt_accuracy(generated, prompts),
        "frechet_distance": frechet_distance(real, generated, features),
        "frechet_distance_real_baseline": frechet_distance(real, fresh_real, features),
        "saturation": saturation_stats(generated),
        "nfe_per_image": nfe,
        "seconds_per_image": seconds / len(prompts),
    }
