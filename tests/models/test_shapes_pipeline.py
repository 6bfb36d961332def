"""The shipped shapes StableDiffusionPipeline, loaded exactly as any diffusers model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch

from accel_diffusion.eval.image_stats import psnr_per_image, vae_reconstruction
from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import all_combinations, combination_prompt, render_dataset
from accel_diffusion.models.shapes.train import DEFAULT_OUT


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        str(DEFAULT_OUT), use_safetensors=True, local_files_only=True, dtype=torch.float32
    )
    p.set_progress_bar_config(disable=True)
    with flushing_denormals():
        yield p


def test_size_and_format() -> None:
    files = [f for f in Path(DEFAULT_OUT).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 30e6
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert (DEFAULT_OUT / "README.md").exists()


def test_components(pipe) -> None:
    assert pipe.vae.config.sample_size == 32 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (sc.num_train_timesteps, sc.beta_schedule, sc.steps_offset) == (1000, "scaled_linear", 1)
    assert sc.prediction_type == "epsilon" and not sc.thresholding
    assert 0.1 < pipe.vae.config.scaling_factor < 10


def test_vae_psnr(pipe) -> None:
    images, _, _ = render_dataset(256, seed=13_579)
    rec_u8 = vae_reconstruction(pipe.vae, images)
    assert psnr_per_image(images, rec_u8).mean() >= 27.0


def test_quick_generation_judged(pipe) -> None:
    from accel_diffusion.eval.shapes_judge import ShapesJudge

    combos = all_combinations()[5::10][:20]
    prompts = [combination_prompt(*c) for c in combos]
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, output_type="np").images
    assert out.shape == (20, 32, 32, 3)
    images = (out * 255).round().astype(np.uint8)
    acc = ShapesJudge.load().prompt_accuracy(images, prompts)
    assert acc["all"] >= 0.9, acc
