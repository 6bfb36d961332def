"""A tiny random-weight MAR model directory on the shipped ``shapes`` text encoder and VAE (a fixture for tests/ar)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from accel_diffusion.ar.head import HEAD_NOISE, DiffusionHead
from accel_diffusion.ar.model import MarTransformer
from accel_diffusion.ar.pipeline import BASE_FILES, MarPipeline, base_dir, file_sha256


@pytest.fixture(scope="session")
def tiny_mar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_mar")
    tokenizer, text_encoder, vae = MarPipeline.load_base("shapes")
    transformer = MarTransformer(token_dim=16, num_tokens=16, text_dim=128, text_len=16, width=16, depth=1, heads=2)
    head = DiffusionHead(token_dim=16, cond_dim=16, width=16, depth=1)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.2)
    config = {"base": "shapes", "patch_size": 2, "latent_channels": 4, "latent_size": 8, "default_ar_iterations": 6,
              "default_head_steps": 4,
              "base_sha256": {name: file_sha256(base_dir("shapes") / name) for name in BASE_FILES}}
    MarPipeline(transformer, head, DDPMScheduler(**HEAD_NOISE, clip_sample=False, variance_type="fixed_small"),
                tokenizer, text_encoder, vae, config).save_pretrained(out)
    return out
