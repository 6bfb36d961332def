"""The shipped shapes StableDiffusionPipeline, loaded exactly as any diffusers model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from accel_diffusion.engine.engine import generate
from accel_diffusion.eval.image_stats import psnr_per_image, vae_reconstruction
from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import all_combinations, combination_prompt, render_dataset
from accel_diffusion.models.shapes.train import DEFAULT_OUT
from accel_diffusion.strategy import GenerationRequest

# Golden: sha256 over (name, float16 bytes) of every tensor, by name, of the weights as they were shipped in
# float16 until issue #16 (trained by `accel-diffusion train shapes --seed 0`). They are stored in float32 since,
# value for value (float16 -> float32 is exact); a retrained model replaces these digests.
FORMER_FP16_SHA256 = {
    "text_encoder/model.safetensors": "c04053d7d2251a294afd7b0e7e9bfb5b61e82c1be2e27aa12586bc97e0d65fcd",
    "unet/diffusion_pytorch_model.safetensors": "91c2900b3bac159b1e24ab7b1306740f705aaa4b44b1de54bfed5151dd4ac77e",
    "vae/diffusion_pytorch_model.safetensors": "29b840b254ac9870b64605259b5d4791d7a1f4fa0108cfcdae9e9533c67f4340",
}


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        str(DEFAULT_OUT), use_safetensors=True, local_files_only=True, dtype=torch.float32
    )
    p.set_progress_bar_config(disable=True)
    with flushing_denormals():
        yield p


def _fp16_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].to(torch.float16).numpy().tobytes())
    return digest.hexdigest()


def test_size_and_format() -> None:
    files = [f for f in Path(DEFAULT_OUT).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 30e6
    builtin = [f for f in Path(DEFAULT_OUT).parent.rglob("*.safetensors")]
    assert sum(f.stat().st_size for f in builtin) < 80e6  # every shipped model's weights together
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


def test_weights_are_float32_and_exactly_the_former_float16_weights() -> None:
    """float32 files (what diffusers and transformers load with no arguments), and no weight changed."""
    for name, digest in FORMER_FP16_SHA256.items():
        tensors = load_file(DEFAULT_OUT / name)
        assert {t.dtype for t in tensors.values()} == {torch.float32}, name
        assert all(torch.equal(t.half().float(), t) for t in tensors.values()), name  # each value a float16 one
        assert _fp16_digest(tensors) == digest, name
    text_config = json.loads((DEFAULT_OUT / "text_encoder" / "config.json").read_text())
    assert text_config.get("dtype", "float32") == "float32"  # transformers loads the dtype named here


def test_plain_diffusers_loads_and_runs_it_with_no_arguments(shapes_model: LoadedPipeline) -> None:
    """The README's promise: a standard pipeline directory, loaded as diffusers' documentation shows."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_OUT))
    pipe.set_progress_bar_config(disable=True)
    dtypes = {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert dtypes == {"vae": torch.float32, "text_encoder": torch.float32, "unet": torch.float32}
    prompt = "a red circle on a blue background"
    theirs = pipe(prompt, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np").images
    assert theirs.shape == (1, 32, 32, 3) and np.isfinite(theirs).all()
    # the same latents, scheduler (the shipped DPM-Solver++) and guidance through our engine
    ours = generate(shapes_model, GenerationRequest.create(model="shapes", prompt=prompt, seed=3, steps=2))
    assert np.abs(ours.images - theirs).max() <= 1e-4


def test_engine_images_are_bit_identical_to_those_of_the_former_float16_files(
        shapes_model: LoadedPipeline, tmp_path: Path) -> None:
    """Our loader upcast the float16 files to float32 on the CPU: storing float32 changed no pixel."""
    former = tmp_path / "shapes_fp16"
    shutil.copytree(DEFAULT_OUT, former)
    for name, digest in FORMER_FP16_SHA256.items():
        tensors = {k: v.half() for k, v in load_file(former / name).items()}
        assert _fp16_digest(tensors) == digest
        save_file(tensors, former / name, metadata={"format": "pt"})
    fp16_model = load_pipeline(shapes_model.spec.model_copy(update={"source": "local", "path": str(former)}))
    request = GenerationRequest.create(model="shapes", prompt=["a red circle on a blue background",
                                                               "a white cross on a green background"],
                                       n=2, seed=0, steps=6)
    assert np.array_equal(generate(fp16_model, request).images, generate(shapes_model, request).images)
