"""Attention backends: which one a model is loaded with, and that the batch-invariant mode always runs one it can
prove (SDPA under its wrappers), also for a model whose processors are xformers'."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from diffusers.models.attention_processor import (
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
)

from accel_diffusion.engine import attention, generate
from accel_diffusion.engine.attention import batch_invariant_processors, configure_attention, select_backend
from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.strategy import GenerationRequest

PROMPTS = ["a red circle on a blue background", "a white cross on a green background", "a yellow triangle"]
SEEDS = [11, 12, 13]


@pytest.mark.parametrize(("preference", "device", "installed", "backend"), [
    ("auto", "cuda", True, "xformers"),
    ("xformers", "cuda", True, "xformers"),
    ("sdpa", "cuda", True, "sdpa"),
    ("auto", "cuda", False, "sdpa"),
    ("xformers", "cuda", False, "sdpa"),
    ("auto", "cpu", True, "sdpa"),
    ("xformers", "cpu", True, "sdpa"),
    ("auto", "mps", True, "sdpa"),
])
def test_the_backend_a_model_is_loaded_with(preference: str, device: str, installed: bool, backend: str) -> None:
    assert select_backend(preference, device, installed) == backend  # type: ignore[arg-type]


def test_asking_for_xformers_without_cuda_warns_and_sets_sdpa(tiny_sd_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    model = load_pipeline(tiny_spec("tiny-attention", tiny_sd_dir))
    unet = model.pipeline.unet
    unet.set_attn_processor(AttnProcessor())
    with caplog.at_level(logging.WARNING, "accel_diffusion.engine.attention"):
        assert configure_attention([unet], torch.device("cpu"), "xformers") == "sdpa"
    assert "xformers attention requested but unavailable (no CUDA device)" in caplog.text
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_batch_invariant_processors_replace_xformers_by_its_sdpa_equivalent_and_keep_provable_ones(
        caplog: pytest.LogCaptureFixture) -> None:
    sdpa, math = AttnProcessor2_0(), AttnProcessor()
    replaced = batch_invariant_processors({"a": XFormersAttnProcessor(), "b": sdpa, "c": math,
                                           "d": XFormersAttnAddedKVProcessor()})
    assert replaced is not None
    assert [type(p) for p in replaced.values()] == [AttnProcessor2_0, AttnProcessor2_0, AttnProcessor,
                                                    AttnAddedKVProcessor2_0]
    assert replaced["b"] is sdpa and replaced["c"] is math
    assert batch_invariant_processors({"a": sdpa, "b": math}) is None  # nothing to change
    unknown = type("CustomProcessor", (), {})()
    with caplog.at_level(logging.WARNING, "accel_diffusion.engine.attention"):
        assert batch_invariant_processors({"x": unknown}) is None
    assert "x (CustomProcessor) is not one the batch-invariant mode can prove" in caplog.text


@pytest.fixture
def xformers_model(tiny_sd_dir: Path) -> LoadedPipeline:
    """The tiny SD pipeline with xformers' processors in its UNet and VAE (as ``configure_attention`` leaves a
    model on CUDA with xformers installed); there are no xformers kernels on this CPU."""
    model = load_pipeline(tiny_spec("tiny-xformers", tiny_sd_dir))
    for module in (model.pipeline.unet, model.pipeline.vae):
        module.set_attn_processor(XFormersAttnProcessor())
    return model


def processor_types(model: LoadedPipeline) -> set[type]:
    return {type(p) for m in (model.pipeline.unet, model.pipeline.vae) for p in m.attn_processors.values()}


def test_batch_invariant_mode_runs_an_xformers_model_as_sdpa_bit_identical_in_any_batch(
        xformers_model: LoadedPipeline, tiny_sd: LoadedPipeline) -> None:
    with pytest.raises((AttributeError, NotImplementedError, RuntimeError)):  # xformers' own kernel: absent here
        generate(xformers_model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], steps=2))
    batched = generate(xformers_model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS, steps=3),
                       seeds=SEEDS, batch_invariant=True)
    assert batched.attention_backend == "sdpa"
    for i, prompt in enumerate(PROMPTS):
        alone = generate(xformers_model, GenerationRequest.create(model="tiny-sd", prompt=prompt, steps=3),
                         seeds=[SEEDS[i]], batch_invariant=True)
        assert np.array_equal(alone.images[0], batched.images[i])
    pair = generate(xformers_model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[1:], steps=3),
                    seeds=SEEDS[1:], batch_invariant=True)
    assert np.array_equal(pair.images, batched.images[1:])
    sdpa = generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS, steps=3), seeds=SEEDS,
                    batch_invariant=True)
    assert np.array_equal(sdpa.images, batched.images)  # the very SDPA path a model loaded with SDPA runs
    assert processor_types(xformers_model) == {XFormersAttnProcessor}  # its own processors are back


def test_the_processors_come_back_when_a_batch_invariant_generation_fails(xformers_model: LoadedPipeline) -> None:
    def fail(module: object, args: object) -> None:
        assert processor_types(xformers_model) == {AttnProcessor2_0}  # during the generation
        raise RuntimeError("a kernel blew up")

    handle = xformers_model.pipeline.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="a kernel blew up"):
            generate(xformers_model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], steps=2),
                     batch_invariant=True)
    finally:
        handle.remove()
    assert processor_types(xformers_model) == {XFormersAttnProcessor}


def test_the_swap_is_worked_out_once_per_model_and_again_when_its_processors_change(
        xformers_model: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """(That the swapped model's images are bit-identical alone and in a batch, call after call, is the test
    above: its generations after the first reuse the first one's swap.)"""
    walks: list[object] = []
    walk = attention._attention_layers
    monkeypatch.setattr(attention, "_attention_layers", lambda model: walks.append(model) or walk(model))
    unet, vae = xformers_model.pipeline.unet, xformers_model.pipeline.vae
    own = {name: p for m in (unet, vae) for name, p in m.attn_processors.items()}
    for _ in range(3):
        with attention.batch_invariant_attention([unet, vae]) as backend:
            assert backend == "sdpa" and processor_types(xformers_model) == {AttnProcessor2_0}
        assert {name: p for m in (unet, vae) for name, p in m.attn_processors.items()} == own  # the very objects
    assert walks == [unet, vae]  # the first call's walks, reused by the next two
    unet.set_attn_processor(AttnProcessor())  # new processors (configure_attention again): a new swap for the UNet
    for _ in range(2):
        with attention.batch_invariant_attention([unet, vae]):
            assert processor_types(xformers_model) == {AttnProcessor, AttnProcessor2_0}  # math is provable: stays
    assert walks == [unet, vae, unet]
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    assert {type(p) for p in vae.attn_processors.values()} == {XFormersAttnProcessor}
    with pytest.raises(RuntimeError, match="a kernel blew up"), attention.batch_invariant_attention([vae]):
        raise RuntimeError("a kernel blew up")
    assert {type(p) for p in vae.attn_processors.values()} == {XFormersAttnProcessor}
