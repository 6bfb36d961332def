"""Engine: pixel parity with diffusers' pipelines, per-image seeds, NFE, hooks, incompatibilities."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from accel_diffusion.engine import Engine, GenerationHooks, generate
from accel_diffusion.errors import GenerationCancelled, IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.registry import get_registry
from accel_diffusion.strategy import GenerationRequest, RequestLimits

PROMPTS = ["a red circle on a blue background", "a white cross on a black background"]


def _diffusers_scheduler(model: LoadedPipeline, sampler: dict, schedule_options: dict | None = None):
    """The exact scheduler our sampler component builds, handed to diffusers' own pipeline."""
    return get_registry().build("sampler", sampler).make_scheduler(model.scheduler_config, schedule_options or {})


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _txt2img_parity(model: LoadedPipeline, directory: Path, sampler: dict, scale: float, steps: int,
                    prompts: list[str], seed: int, size: int, pipeline_cls: type = StableDiffusionPipeline,
                    rescale: float = 0.0, negative_prompt: str | None = None) -> float:
    request = GenerationRequest.create(
        model=model.model_id, prompt=prompts, seed=seed, steps=steps, width=size, height=size,
        negative_prompt=negative_prompt,
        strategy={"sampler": sampler, "guidance": {"name": "cfg", "scale": scale, "rescale": rescale}},
    )
    ours = generate(model, request)
    reference = pipeline_cls.from_pretrained(directory, local_files_only=True, dtype=model.dtype)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = _diffusers_scheduler(model, sampler)
    extra = {"guidance_rescale": rescale} if rescale else {}
    if negative_prompt is not None:
        extra["negative_prompt"] = [negative_prompt] * len(prompts)
    theirs = reference(
        prompts, num_inference_steps=steps, guidance_scale=scale, height=size, width=size,
        generator=_generators(list(range(seed, seed + len(prompts)))), output_type="np", **extra,
    ).images
    assert ours.images.shape == theirs.shape
    return float(np.abs(ours.images - theirs).max())


@pytest.mark.parametrize("sampler", [
    {"name": "ddim"}, {"name": "dpmpp_2m"}, {"name": "euler"}, {"name": "unipc"},
    {"name": "deis", "variant": "tab", "order": 3}, {"name": "hb", "beta": 0.8}, {"name": "ghvb", "order": 3.8},
])
def test_txt2img_parity_with_diffusers_tiny(tiny_sd: LoadedPipeline, tiny_sd_dir: Path, sampler: dict) -> None:
    assert _txt2img_parity(tiny_sd, tiny_sd_dir, sampler, 5.0, 10, PROMPTS, 11, 32) <= 1e-4


def test_guidance_rescale_parity(tiny_sd: LoadedPipeline, tiny_sd_dir: Path) -> None:
    assert _txt2img_parity(tiny_sd, tiny_sd_dir, {"name": "ddim"}, 7.0, 6, PROMPTS[:1], 2, 32, rescale=0.7) <= 1e-4


def test_negative_prompt_parity(tiny_sd: LoadedPipeline, tiny_sd_dir: Path) -> None:
    diff = _txt2img_parity(tiny_sd, tiny_sd_dir, {"name": "ddim"}, 5.0, 6, PROMPTS, 4, 32,
                           negative_prompt="a green square")
    assert diff <= 1e-4
    with_negative = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=4, steps=6,
                                                               negative_prompt="a green square"))
    without = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=4, steps=6))
    assert np.abs(with_negative.images - without.images).max() > 1e-3


def test_v_prediction_parity(tiny_sd_v_dir: Path) -> None:
    model = load_pipeline(tiny_spec("tiny-v", tiny_sd_v_dir))
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert _txt2img_parity(model, tiny_sd_v_dir, {"name": "dpmpp_2m"}, 4.0, 8, PROMPTS, 5, 32) <= 1e-4


def test_sdxl_parity(tiny_sdxl_dir: Path) -> None:
    model = load_pipeline(tiny_spec("tiny-sdxl", tiny_sdxl_dir))
    assert model.family == "sdxl"
    diff = _txt2img_parity(model, tiny_sdxl_dir, {"name": "dpmpp_2m"}, 5.0, 8, PROMPTS, 3, 32,
                           pipeline_cls=StableDiffusionXLPipeline)
    assert diff <= 1e-4


@pytest.mark.parametrize("negative_prompt", [None, "", "a blue circle"])
def test_sdxl_negative_prompts_parity(tiny_sdxl_dir: Path, negative_prompt: str | None) -> None:
    """None uses SDXL's all-zero negative conditioning (force_zeros_for_empty_prompt); "" encodes it."""
    model = load_pipeline(tiny_spec("tiny-sdxl", tiny_sdxl_dir))
    diff = _txt2img_parity(model, tiny_sdxl_dir, {"name": "ddim"}, 4.0, 5, PROMPTS[:1], 9, 32,
                           pipeline_cls=StableDiffusionXLPipeline, negative_prompt=negative_prompt)
    assert diff <= 1e-4


def test_sdxl_img2img_parity(tiny_sdxl_dir: Path) -> None:
    model = load_pipeline(tiny_spec("tiny-sdxl", tiny_sdxl_dir))
    init = _init_image()
    request = GenerationRequest.create(
        model="tiny-sdxl", prompt=PROMPTS[1], n=2, seed=5, steps=8, init_image=init, strength=0.75,
        strategy={"sampler": {"name": "dpmpp_2m"}, "guidance": {"name": "cfg", "scale": 5.0}},
    )
    ours = generate(model, request)
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = _diffusers_scheduler(model, {"name": "dpmpp_2m"})
    theirs = reference(PROMPTS[1], image=init, strength=0.75, num_inference_steps=8, guidance_scale=5.0,
                       num_images_per_prompt=2, generator=_generators([5, 6]), output_type="np").images
    assert np.abs(ours.images - theirs).max() <= 1e-4


def test_sdxl_fp16_keeps_an_fp32_vae(tiny_sdxl_dir: Path) -> None:
    model = load_pipeline(tiny_spec("tiny-sdxl-fp16", tiny_sdxl_dir, dtype="float16"))
    assert model.pipeline.unet.dtype == torch.float16
    assert model.pipeline.vae.dtype == torch.float32  # force_upcast: decided once, at load


def _init_image() -> Image.Image:
    yy, xx = np.mgrid[0:32, 0:32]
    array = np.stack([xx * 8, yy * 8, 255 - xx * 4], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.mark.parametrize(("sampler", "strength"), [
    ({"name": "ddim"}, 0.6), ({"name": "dpmpp_2m"}, 0.8), ({"name": "deis", "order": 2}, 0.7),
    ({"name": "hb", "beta": 0.8}, 0.8), ({"name": "ghvb", "order": 2.8}, 0.6),
])
def test_img2img_parity_with_diffusers_tiny(
    tiny_sd: LoadedPipeline, tiny_sd_dir: Path, sampler: dict, strength: float
) -> None:
    init = _init_image()
    request = GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], n=2, seed=7, steps=10, init_image=init, strength=strength,
        strategy={"sampler": sampler, "guidance": {"name": "cfg", "scale": 5.0}},
    )
    ours = generate(tiny_sd, request)
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = _diffusers_scheduler(tiny_sd, sampler)
    theirs = reference(
        PROMPTS[0], image=init, strength=strength, num_inference_steps=10, guidance_scale=5.0,
        num_images_per_prompt=2, generator=_generators([7, 8]), output_type="np",
    ).images
    assert np.abs(ours.images - theirs).max() <= 1e-4
    assert ours.steps == int(10 * strength)
    assert ours.nfe == 2 * int(10 * strength)
    assert ours.extra["mode"] == "img2img"


def test_shapes_model_parity_with_diffusers(shapes_model: LoadedPipeline) -> None:
    directory = Path(shapes_model.spec.location())
    for sampler in ({"name": "ddim"}, {"name": "dpmpp_2m"}):
        diff = _txt2img_parity(shapes_model, directory, sampler, 5.0, 25, PROMPTS, 0, 32)
        assert diff <= 1e-4, sampler
    init = _init_image()
    request = GenerationRequest.create(
        model="shapes", prompt="a blue square on a white background", seed=1, steps=25, init_image=init,
        strength=0.7, strategy={"sampler": {"name": "dpmpp_2m"}, "guidance": {"name": "cfg", "scale": 5.0}},
    )
    ours = generate(shapes_model, request)
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = _diffusers_scheduler(shapes_model, {"name": "dpmpp_2m"})
    theirs = reference("a blue square on a white background", image=init, strength=0.7, num_inference_steps=25,
                       guidance_scale=5.0, generator=_generators([1]), output_type="np").images
    assert np.abs(ours.images - theirs).max() <= 1e-4


@pytest.mark.parametrize(
    "sampler", [{"name": "dpmpp_2m"}, {"name": "euler", "ancestral": True}, {"name": "ddim", "eta": 1.0}]
)
def test_batch_equals_single_calls(tiny_sd: LoadedPipeline, sampler: dict) -> None:
    common = {"model": "tiny-sd", "steps": 6, "strategy": {"sampler": sampler}}
    batch = generate(tiny_sd, GenerationRequest.create(prompt=PROMPTS, n=2, seed=100, **common))
    assert batch.seeds == [100, 101, 102, 103]
    assert batch.prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    for k, (prompt, seed) in enumerate(zip(batch.prompts, batch.seeds)):
        single = generate(tiny_sd, GenerationRequest.create(prompt=prompt, seed=seed, **common))
        # Batched BLAS blocking differs from batch 1 by ~1e-6 per UNet call / ~1e-5 in the VAE: floats agree
        # to 1e-5, and a uint8 pixel may flip by one level only where it sits on a rounding boundary.
        assert np.abs(single.images[0] - batch.images[k]).max() <= 1e-5
        levels = np.abs(single.to_uint8()[0].astype(int) - batch.to_uint8()[k].astype(int))
        assert levels.max() <= 1 and (levels == 0).mean() >= 0.999
    # different seeds give different images (the seeds are really used)
    assert np.abs(batch.images[0] - batch.images[1]).max() > 0.01


@pytest.mark.parametrize(
    ("guidance", "nfe_per_step", "passes_per_step"),
    [({"name": "cfg", "scale": 5.0}, 2, 1), ({"name": "cfg", "scale": 1.0}, 1, 1), ({"name": "none"}, 1, 1)],
)
def test_nfe_counts_every_branch(tiny_sd: LoadedPipeline, guidance: dict, nfe_per_step: int,
                                 passes_per_step: int) -> None:
    calls = []
    handle = tiny_sd.pipeline.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        result = generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt=PROMPTS, seed=0, steps=7, strategy={"guidance": guidance}))
    finally:
        handle.remove()
    assert result.nfe == 7 * nfe_per_step
    assert result.forward_passes == len(calls) == 7 * passes_per_step
    assert all(rows == 2 * nfe_per_step for rows in calls)  # 2 images x branches per call


def test_cfg_scale_one_equals_no_guidance(tiny_sd: LoadedPipeline) -> None:
    a = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=3, steps=5,
                                                   strategy={"guidance": {"name": "cfg", "scale": 1.0}}))
    b = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=3, steps=5,
                                                   strategy={"guidance": {"name": "none"}}))
    assert np.array_equal(a.images, b.images)


def test_progress_preview_and_cancel_hooks(tiny_sd: LoadedPipeline) -> None:
    events, previews = [], []
    hooks = GenerationHooks(on_step=events.append, on_preview=lambda step, images: previews.append((step, images)))
    request = GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=8, preview_every=3)
    result = generate(tiny_sd, request, hooks)
    assert [e.step for e in events] == list(range(1, 9)) and all(e.total == 8 for e in events)
    assert [p[0] for p in previews] == [3, 6]
    assert previews[0][1].shape == result.images.shape
    assert not np.array_equal(previews[1][1], result.images)

    cancel = threading.Event()
    seen = []

    def on_step(event):
        seen.append(event.step)
        if event.step == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled) as err:
        generate(tiny_sd, request, GenerationHooks(on_step=on_step, cancel=cancel))
    assert seen == [1, 2, 3] and err.value.step == 3 and err.value.total == 8
    with pytest.raises(GenerationCancelled):
        generate(tiny_sd, request, GenerationHooks(cancel=lambda: True))


def test_schedules(tiny_sd: LoadedPipeline) -> None:
    events = []
    explicit = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1,
        strategy={"sampler": {"name": "euler"},
                  "schedule": {"name": "timesteps", "timesteps": [999, 800, 500, 200, 20]}},
    ), GenerationHooks(on_step=events.append))
    assert explicit.steps == 5 and explicit.nfe == 10
    assert [round(e.timestep) for e in events] == [999, 800, 500, 200, 20]
    karras = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=6,
        strategy={"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "karras"}}))
    default = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=6))
    assert karras.steps == 6 and np.abs(karras.images - default.images).max() > 1e-3
    leading = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=6,
        strategy={"schedule": {"name": "spacing", "spacing": "leading"}}))
    assert np.abs(leading.images - default.images).max() > 1e-3


def test_incompatible_schedule_is_a_clear_error(tiny_sd: LoadedPipeline) -> None:
    with pytest.raises(IncompatibleStrategyError) as err:
        generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a", strategy={"sampler": {"name": "ddim"}, "schedule": {"name": "karras"}}))
    assert err.value.field == "strategy.schedule.name" and "'dpmpp_2m'" in err.value.allowed
    with pytest.raises(IncompatibleStrategyError):
        generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a",
            strategy={"sampler": {"name": "ddim"}, "schedule": {"name": "timesteps", "timesteps": [900, 10]}}))
    with pytest.raises(InvalidRequestError, match="below the model's 1000"):
        generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a",
            strategy={"sampler": {"name": "euler"}, "schedule": {"name": "timesteps", "timesteps": [1000, 10]}}))


def test_every_sampler_runs_txt2img_and_img2img(tiny_sd: LoadedPipeline) -> None:
    for name in get_registry().names("sampler"):
        for init in (None, _init_image()):
            result = generate(tiny_sd, GenerationRequest.create(
                model="tiny-sd", prompt=PROMPTS[0], seed=0, steps=4, init_image=init, strength=0.75,
                strategy={"sampler": {"name": name}}))
            assert np.isfinite(result.images).all() and result.images.shape == (1, 32, 32, 3), name


def test_engine_uses_registry_and_reports(tiny_registry) -> None:
    engine = Engine(tiny_registry)
    result = engine.generate(GenerationRequest.create(model="tiny-sdxl", prompt="a cross", seed=0, steps=3))
    summary = result.summary()
    assert summary["model"] == "tiny-sdxl" and summary["attention_backend"] == "sdpa"
    assert summary["strategy"]["sampler"]["name"] == "dpmpp_2m" and summary["nfe"] == 6
    assert set(summary["timings"]) == {"prepare", "encode_prompt", "prepare_latents", "denoise", "decode", "total"}
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(GenerationRequest.create(model="nope", prompt="a"))
    assert err.value.field == "model" and "'tiny-sd'" in err.value.allowed


def test_limits_apply_to_the_model_defaults_a_request_leaves_out(tiny_sd_dir: Path) -> None:
    wide = tiny_spec("wide", tiny_sd_dir).model_copy(update={"default_width": 2056})
    registry = ModelRegistry([tiny_spec("tiny-sd", tiny_sd_dir), wide])
    with pytest.raises(InvalidRequestError) as err:  # the Python API's default limits: at most 2048 wide
        Engine(registry).generate(GenerationRequest.create(model="wide", prompt="a", steps=1))
    assert err.value.field == "width" and err.value.message.startswith("is 2056 (the model's default")
    strict = Engine(registry, limits=RequestLimits(max_steps=8, max_height=24))
    for fields, field, fragment in (
            ({"height": 16}, "steps", "is 10 (the model's default, as the request gave none); at most 8"),
            ({"steps": 2}, "height", "is 32 (the model's default, as the request gave none); at most 24"),
            ({"steps": 2, "height": 16, "strategy": {"schedule": {"name": "timesteps",
                                                                  "timesteps": list(range(900, -1, -100))}}},
             "strategy.schedule", "runs 10 steps; at most 8")):
        with pytest.raises(InvalidRequestError) as err:
            strict.generate(GenerationRequest.create(model="tiny-sd", prompt="a", **fields))
        assert err.value.field == field and fragment in err.value.message
    assert strict.generate(GenerationRequest.create(model="tiny-sd", prompt="a", steps=2, height=16)).height == 16


def test_strength_that_leaves_no_step_is_rejected(tiny_sd: LoadedPipeline) -> None:
    with pytest.raises(InvalidRequestError) as err:
        generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt="a", steps=4, strength=0.1,
                                                   init_image=_init_image()))
    assert err.value.field == "strength"


@pytest.mark.parametrize("sampler", [{"name": "euler"}, {"name": "dpmpp_2m"}])
def test_previews_show_the_denoised_estimate(shapes_model: LoadedPipeline, sampler: dict) -> None:
    """Previews decode the step's x0 estimate: late previews are close to the final image for every sampler
    (Euler's latents are sigma-scaled, so decoding x_t itself would not be)."""
    previews = {}
    request = GenerationRequest.create(model="shapes", prompt=PROMPTS[0], seed=2, steps=20, preview_every=5,
                                       strategy={"sampler": sampler}, vae="tiny")  # previews' decoder too
    final = generate(shapes_model, request, GenerationHooks(on_preview=lambda k, im: previews.update({k: im})))
    assert sorted(previews) == [5, 10, 15]
    distance = {k: float(np.abs(im - final.images).mean()) for k, im in previews.items()}
    assert distance[15] < 0.03 and distance[15] < distance[5]


def test_previews_decode_with_the_tiny_autoencoder(shapes_model: LoadedPipeline,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with a tiny autoencoder previews through it (TAESD-style live previews); the final
    images still come from the request's autoencoder."""
    calls = {"vae": 0, "tiny": 0}

    def counted(name: str, decode: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return decode(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(shapes_model.pipeline.vae, "decode", counted("vae", shapes_model.pipeline.vae.decode))
    monkeypatch.setattr(shapes_model.tiny_vae, "decode", counted("tiny", shapes_model.tiny_vae.decode))
    request = GenerationRequest.create(model="shapes", prompt=PROMPTS[0], seed=2, steps=12, preview_every=4)
    previews = {}
    with_previews = generate(shapes_model, request, GenerationHooks(on_preview=lambda k, im: previews.update({k: im})))
    assert sorted(previews) == [4, 8] and calls == {"vae": 1, "tiny": 2}
    without = generate(shapes_model, request.model_copy(update={"preview_every": 0}))
    assert np.array_equal(with_previews.images, without.images)


def test_tiny_autoencoder_decodes_and_encodes_the_same_latents(shapes_model: LoadedPipeline) -> None:
    """vae="tiny": the same denoising (the same seeds' noise too), the model's tiny autoencoder at both
    ends; its images are close to the VAE's (> 22 dB PSNR), for txt2img and img2img alike."""
    from accel_diffusion.eval.image_stats import psnr_per_image

    def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    init = Image.fromarray(np.asarray(Image.new("RGB", (32, 32), (200, 30, 30))))
    for extra in ({}, {"init_image": init, "strength": 0.6}):
        images = {}
        for vae in ("full", "tiny"):
            request = GenerationRequest.create(model="shapes", prompt=PROMPTS, seed=3, steps=25, vae=vae, **extra)
            result = generate(shapes_model, request)
            assert result.nfe == (30 if extra else 50)
            images[vae] = to_uint8_nhwc(result.images)
        assert psnr_per_image(images["full"], images["tiny"]).min() > 22.0
        assert not np.array_equal(images["full"], images["tiny"])  # it did decode with the other one
        again = generate(shapes_model, GenerationRequest.create(model="shapes", prompt=PROMPTS, seed=3, steps=25,
                                                                vae="tiny", **extra))
        assert np.array_equal(to_uint8_nhwc(again.images), images["tiny"])


def test_tiny_autoencoder_needs_one_declared(tiny_sd: LoadedPipeline) -> None:
    with pytest.raises(InvalidRequestError) as err:
        generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt="a", steps=2, vae="tiny"))
    assert err.value.field == "vae"
    with pytest.raises(InvalidRequestError):
        GenerationRequest.create(model="tiny-sd", prompt="a", vae="taesd")


def test_concurrent_generations_do_not_interfere(tiny_sd: LoadedPipeline) -> None:
    requests = [
        GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[k % 2], seed=10 + k, steps=5,
                                 strategy={"sampler": {"name": ["dpmpp_2m", "unipc", "euler", "ddim"][k]}})
        for k in range(4)
    ]
    sequential = [generate(tiny_sd, r).images for r in requests]
    results: dict[int, np.ndarray] = {}

    def run(k: int) -> None:
        results[k] = generate(tiny_sd, requests[k]).images

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(4):
        assert np.abs(results[k] - sequential[k]).max() <= 1e-5, k


def test_scheduler_step_limits_become_field_errors(tiny_sd: LoadedPipeline) -> None:
    with pytest.raises(InvalidRequestError) as err:
        generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt="a", steps=60,
                                                   strategy={"sampler": {"name": "lcm"}}))
    assert err.value.field == "steps" and "'lcm'" in err.value.message


def test_noise_level_grids_for_our_samplers(tiny_sd: LoadedPipeline) -> None:
    events: list = []
    quadratic = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=5,
        strategy={"sampler": {"name": "deis"}}), GenerationHooks(on_step=events.append))
    t = np.array([e.timestep for e in events])
    assert quadratic.nfe == 10 and not np.allclose(t, np.round(t))  # fractional timesteps, DEIS's own grid
    np.testing.assert_allclose(np.diff(np.sqrt(t)), np.diff(np.sqrt(t)).mean(), rtol=1e-4)
    leading = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=5,
        strategy={"sampler": {"name": "deis"}, "schedule": {"name": "spacing", "spacing": "leading"}}),
        GenerationHooks(on_step=events.append))
    assert [e.timestep for e in events[5:]] == [831.0, 665.0, 499.0, 333.0, 167.0] and leading.nfe == 10
    karras3 = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=5,
        strategy={"sampler": {"name": "ghvb", "order": 2.5}, "schedule": {"name": "karras", "rho": 3.0}}))
    assert karras3.strategy.schedule == {"name": "karras", "rho": 3.0} and np.isfinite(karras3.images).all()
    with pytest.raises(IncompatibleStrategyError) as err:
        generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a", strategy={"sampler": {"name": "ddim"},
                                                  "schedule": {"name": "spacing", "spacing": "log_snr"}}))
    assert err.value.allowed == "'deis', 'ghvb', 'hb'"
    with pytest.raises(IncompatibleStrategyError, match="rho=3"):
        generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a", strategy={"sampler": {"name": "dpmpp_2m"},
                                                  "schedule": {"name": "karras", "rho": 3.0}}))


def test_fp16_generation_on_cpu_is_within_4_levels_of_fp32(shapes_model: LoadedPipeline) -> None:
    """The fp16 path (a model loaded with dtype float16: UNet, text encoder and VAE in half precision) runs end
    to end on the CPU. Tolerance: the same seeds give images within 4 of 255 levels of fp32's, 0.5 on average
    (measured at 25 steps: at most 2, 0.07 on average), and the judge calls the same prompts right."""
    from accel_diffusion.eval.shapes_judge import ShapesJudge

    fp16_model = load_pipeline(shapes_model.spec.model_copy(update={"dtype": "float16"}))
    assert fp16_model.pipeline.unet.dtype == torch.float16 and fp16_model.pipeline.vae.dtype == torch.float16
    prompts = ["a red circle on a blue background", "a white cross on a green background"]
    request = GenerationRequest.create(model="shapes", prompt=prompts, seed=0, steps=8)
    half, full = generate(fp16_model, request).to_uint8(), generate(shapes_model, request).to_uint8()
    assert half.shape == full.shape == (2, 32, 32, 3)
    difference = np.abs(half.astype(int) - full.astype(int))
    assert difference.max() <= 4 and difference.mean() <= 0.5, (difference.max(), difference.mean())
    judge = ShapesJudge.load()
    assert judge.prompt_accuracy(half, prompts)["all"] == judge.prompt_accuracy(full, prompts)["all"]
