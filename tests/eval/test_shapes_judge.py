"""The shipped shapes judge classifier (the measuring stick for prompt accuracy)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from accel_diffusion.eval.image_stats import vae_reconstruction
from accel_diffusion.eval.shapes_judge import DEFAULT_DIR, ShapesJudge
from accel_diffusion.models.shapes.render import parse_caption, render_dataset

VAE_DIR = Path(__file__).resolve().parents[2] / "accel_diffusion" / "models" / "builtin" / "shapes" / "vae"


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    assert (DEFAULT_DIR / "model.safetensors").exists()
    return ShapesJudge.load()


def test_fresh_renders(judge: ShapesJudge) -> None:
    images, captions, _ = render_dataset(1000, seed=987_654)
    acc = judge.prompt_accuracy(images, captions)
    assert acc["all"] >= 0.98, acc
    preds = judge.predict(images[:100])
    truth = [parse_caption(c) for c in captions[:100]]
    assert sum(p == t for p, t in zip(preds, truth)) >= 95


def test_pil_input_and_features(judge: ShapesJudge) -> None:
    images, _captions, _ = render_dataset(8, seed=5)
    pils = [Image.fromarray(im) for im in images]
    assert judge.predict(pils) == judge.predict(images)
    feats = judge.features(images)
    assert feats.shape[0] == 8 and feats.ndim == 2 and torch.isfinite(feats).all()


def test_vae_reconstructions(judge: ShapesJudge) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(VAE_DIR, use_safetensors=True, local_files_only=True, dtype=torch.float32)
    vae = vae.eval()
    images, captions, _ = render_dataset(500, seed=24_680)
    rec_u8 = vae_reconstruction(vae, images)
    acc = judge.prompt_accuracy(rec_u8, captions)
    assert acc["all"] >= 0.95, acc
    assert np.isfinite(acc["shape"])
