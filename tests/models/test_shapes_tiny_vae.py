"""The shipped TAESD-style tiny autoencoder of `shapes`: a diffusers AutoencoderTiny that speaks the
KL VAE's latent space (encoder latents, decoder images), and its distillation script."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors import safe_open

from accel_diffusion.engine.engine import _model_latents, _vae_latents
from accel_diffusion.eval.image_stats import psnr_per_image, to_uint8_nhwc
from accel_diffusion.eval.shapes_judge import to_tensor
from accel_diffusion.models.shapes.render import render_dataset
from accel_diffusion.models.shapes.train_tiny_vae import (
    DEFAULT_OUT,
    DEFAULT_TEACHER,
    off_distribution_images,
    train_shapes_tiny_vae,
)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderTiny:
    return AutoencoderTiny.from_pretrained(str(DEFAULT_OUT), use_safetensors=True, local_files_only=True,
                                           dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(str(DEFAULT_TEACHER), local_files_only=True, dtype=torch.float32).eval()


def test_shipped_as_fp16_safetensors_with_a_model_card() -> None:
    files = {f.name: f for f in DEFAULT_OUT.iterdir()}
    assert set(files) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "training_info.json"}
    assert files["diffusion_pytorch_model.safetensors"].stat().st_size < 1_000_000
    with safe_open(str(files["diffusion_pytorch_model.safetensors"]), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    config = json.loads(files["config.json"].read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["latent_channels"] == 4
    assert config["scaling_factor"] == 1.0  # latents already in the UNet's space, as TAESD's
    assert "block_out_channels" not in config  # diffusers saves it, then warns on every load


@torch.no_grad()
def test_speaks_the_kl_vae_latent_space(tiny: AutoencoderTiny, teacher: AutoencoderKL) -> None:
    images, _, _ = render_dataset(128, seed=777)
    x = to_tensor(images)
    kl_latents = _model_latents(teacher, teacher.encode(x).latent_dist.mean)
    tiny_latents = tiny.encode(x).latents
    assert tiny_latents.shape == kl_latents.shape == (128, 4, 8, 8)
    relative_rmse = (tiny_latents - kl_latents).pow(2).mean().sqrt() / kl_latents.std()
    assert relative_rmse < 0.15
    kl_images = to_uint8_nhwc((teacher.decode(_vae_latents(teacher, kl_latents)).sample.clamp(-1, 1) + 1) / 2)
    tiny_images = to_uint8_nhwc((tiny.decode(kl_latents).sample.clamp(-1, 1) + 1) / 2)
    assert psnr_per_image(kl_images, tiny_images).mean() > 28.0  # the same picture from the same latents
    round_trip = to_uint8_nhwc((tiny.decode(tiny_latents).sample.clamp(-1, 1) + 1) / 2)
    assert psnr_per_image(images, round_trip).mean() > 25.0


@torch.no_grad()
def test_follows_the_kl_encoder_off_distribution(tiny: AutoencoderTiny, teacher: AutoencoderKL) -> None:
    images = off_distribution_images(128, render_dataset(64, seed=5)[0], np.random.default_rng(5))
    x = to_tensor(images)
    kl_latents = _model_latents(teacher, teacher.encode(x).latent_dist.mean)
    relative_rmse = (tiny.encode(x).latents - kl_latents).pow(2).mean().sqrt() / kl_latents.std()
    assert relative_rmse < 0.25


def test_distillation_script_trains_and_saves_a_loadable_model(tmp_path: Path) -> None:
    info = train_shapes_tiny_vae(tmp_path / "tiny", n_images=512, n_off=128, steps=40, threads=None)
    loaded = AutoencoderTiny.from_pretrained(str(tmp_path / "tiny"), local_files_only=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in AutoencoderTiny.from_pretrained(str(DEFAULT_OUT), local_files_only=True).parameters())
    metrics = info["metrics"]["renders"]
    # 40 steps learn something (an untrained decoder is ~10 dB from the KL decoder), far from the shipped model
    assert 11.0 < metrics["tiny_decoder_vs_kl_decoder_psnr"] < 28.0
    assert (tmp_path / "tiny" / "README.md").read_text().startswith("# shapes_tiny_vae")
    assert "block_out_channels" not in json.loads((tmp_path / "tiny" / "config.json").read_text())
