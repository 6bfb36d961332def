"""`accel-diffusion train shapes` writes what is shipped: a float32 StableDiffusionPipeline directory that plain
diffusers loads and runs with no arguments (a few training steps here; the real run takes ~40 minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from accel_diffusion.models.shapes.train import train_shapes


def test_training_writes_a_float32_pipeline_that_plain_diffusers_runs(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "shapes"
    info = train_shapes(out, n_images=256, vae_steps=2, vae_batch=8, unet_steps=2, unet_batch=8, evaluate=False,
                        threads=None)
    assert info["args"]["dtype"] == "fp32"
    weights = sorted(out.rglob("*.safetensors"))
    assert [str(p.relative_to(out)) for p in weights] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]
    assert {t.dtype for p in weights for t in load_file(p).values()} == {torch.float32}
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    assert "`torch_dtype` (float32 weights)" in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle on a blue background", num_inference_steps=2, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
