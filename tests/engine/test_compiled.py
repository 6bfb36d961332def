"""engine_acceleration = "compile": static-shape graphs per row bucket, built ahead or in the background.

One compiled tiny model is shared by the module's tests (inductor builds each of its graphs once)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from PIL import Image
from torch._dynamo.utils import counters

from accel_diffusion.engine import GenerationHooks, compiled, generate
from accel_diffusion.engine import engine as engine_module
from accel_diffusion.errors import GenerationCancelled, InvalidRequestError
from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")
BUCKETS = (2, 4)  # one image (1 row) pads to 2 rows, three to 4
PROMPTS = ["a red circle on a blue background", "a white cross on a black background", "a green square"]


@pytest.fixture(scope="module")
def model(tiny_sd_dir: Path) -> LoadedPipeline:
    """A tiny SD model of its own, compiled with buckets 2 and 4 and warmed (UNet and decode: 4 graphs)."""
    loaded = load_pipeline(tiny_spec("tiny-sd", tiny_sd_dir))
    compiled_model = loaded.compiled_model(BUCKETS)
    built = compiled.warm(loaded)
    assert [(g["call"], g["rows"]) for g in built] == [
        ("unet", 2), ("unet", 4), ("decode:AutoencoderKL", 2), ("decode:AutoencoderKL", 4)]
    # one graph per (call, bucket), each built once (dynamo's own graph counter need not move: an earlier test
    # in the process may have compiled the same code and shapes, and dynamo reuses that graph)
    assert [(len(call.ready), len(call.stats.builds)) for call in compiled_model.calls()] == [(2, 2), (2, 2)]
    return loaded


class LatentSpy:
    """Records the latents each generation hands to the decoder (the real decode still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.latents: list[torch.Tensor] = []
        real = engine_module._decode

        def decode(model: Any, latents: torch.Tensor, vae: Any = None, decoder: Any = None) -> np.ndarray:
            self.latents.append(latents.clone())
            return real(model, latents, vae, decoder)

        monkeypatch.setattr(engine_module, "_decode", decode)


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


CASES = [
    *[({"sampler": {"name": s}}, 1, False) for s in
      ("ddim", "deis", "diffusers_deis", "dpmpp_2m", "euler", "ghvb", "hb", "unipc")],
    ({"guidance": {"name": "apg", "scale": 5.0}}, 1, False),
    ({"guidance": {"name": "rcfg", "scale": 2.0}}, 1, True),
    ({"guidance": {"name": "none"}}, 3, False),  # 3 rows padded to the 4-row graph
    ({"guidance": {"name": "cfg", "scale": 5.0}}, 2, False),  # 4 rows
    ({"guidance": {"name": "cfg", "scale": 5.0}}, 1, True),  # img2img
]


def test_compiled_latents_match_eager_for_every_sampler_guidance_and_img2img(
        model: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call runs a graph built by the warm-up (no eager call, no new graph), and the latents agree
    with the eager engine's within 1e-3."""
    spy = LatentSpy(monkeypatch)
    stats = model.compiled_model().unet.stats
    graphs, eager_calls = counters["stats"]["unique_graphs"], stats.eager_calls
    worst = {}
    for strategy, images, img2img in CASES:
        request = GenerationRequest.create(
            model="tiny-sd", prompt=PROMPTS[:images] if images > 1 else PROMPTS[0], seed=7, steps=4,
            strategy=strategy, init_image=_image() if img2img else None, strength=0.75)
        eager = generate(model, request)
        fast = generate(model, request, acceleration="compile")
        assert fast.extra["acceleration"] == "compile" and fast.nfe == eager.nfe
        name = str(strategy) + (" img2img" if img2img else "")
        worst[name] = float((spy.latents[-1] - spy.latents[-2]).abs().max())
        assert np.abs(fast.images - eager.images).max() < 1e-3
    assert max(worst.values()) < 1e-3, worst
    assert counters["stats"]["unique_graphs"] == graphs and stats.eager_calls == eager_calls


def test_a_shape_without_a_graph_runs_eagerly_and_gets_one_in_the_background(model: LoadedPipeline,
                                                                            tiny_sd_dir: Path) -> None:
    """A model of its own with one bucket and no graph built: its first request runs eagerly (the eager
    images, bit for bit) while the builder thread compiles the UNet's and the decode's graphs; the next
    request runs them. (Its graphs are the shared model's at the same shapes: dynamo and inductor's cache make
    the builds quick, so the first request holds the builder off; what is tested is when each call runs
    eagerly and when on a graph.)"""
    fresh = load_pipeline(tiny_spec("tiny-sd", tiny_sd_dir))
    compiled_model = fresh.compiled_model(BUCKETS[:1])
    unet, decoder = compiled_model.unet, compiled_model.decoder(fresh.pipeline.vae)
    request = GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[1], seed=3, steps=3,
                                       strategy={"guidance": {"name": "none"}})
    expected = generate(fresh, request)
    with compiled._BUILD_LOCK:  # the builder waits for the lock: no graph is ready during this request
        first = generate(fresh, request, acceleration="compile")
    assert (unet.stats.eager_calls, unet.stats.compiled_calls) == (3, 0)
    assert (decoder.stats.eager_calls, decoder.stats.compiled_calls) == (1, 0)
    np.testing.assert_array_equal(first.images, expected.images)  # eager: the very same bits
    assert compiled.BUILDER.wait(timeout=300)
    assert [(b["rows"], b["background"]) for b in unet.stats.builds + decoder.stats.builds] == [(2, True)] * 2
    second = generate(fresh, request, acceleration="compile")
    assert (unet.stats.eager_calls, unet.stats.compiled_calls) == (3, 3)
    assert (decoder.stats.eager_calls, decoder.stats.compiled_calls) == (1, 1)
    assert np.abs(second.images - expected.images).max() < 1e-3


def test_batch_invariant_mode_keeps_its_promise_when_compiled(model: LoadedPipeline) -> None:
    """An image is bit-identical alone and in a batch of two, compiled: each image runs its own graph call."""
    strategy = {"guidance": {"name": "cfg", "scale": 5.0}}
    alone = generate(model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[1], seed=11, steps=4,
                                                     strategy=strategy), batch_invariant=True, acceleration="compile")
    batch = generate(model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[:2], steps=4, strategy=strategy),
                     seeds=[5, 11], batch_invariant=True, acceleration="compile")
    np.testing.assert_array_equal(batch.images[1], alone.images[0])
    eager = generate(model, GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[1], seed=11, steps=4,
                                                     strategy=strategy))
    assert np.abs(alone.images[0] - eager.images[0]).max() < 1e-3


def test_progress_previews_and_cancellation_as_in_eager_mode(model: LoadedPipeline) -> None:
    request = GenerationRequest.create(model="tiny-sd", prompt=PROMPTS[0], seed=1, steps=6, preview_every=2)
    runs = {}
    for acceleration in ("none", "compile"):
        events, previews = [], []
        hooks = GenerationHooks(on_step=events.append, on_preview=lambda k, im, p=previews: p.append((k, im)))
        generate(model, request, hooks, acceleration=acceleration)
        runs[acceleration] = events, previews
    (eager_events, eager_previews), (events, previews) = runs["none"], runs["compile"]
    assert [(e.step, e.total, e.timestep) for e in events] == [(e.step, e.total, e.timestep) for e in eager_events]
    assert [k for k, _ in previews] == [k for k, _ in eager_previews] == [2, 4]
    assert max(np.abs(a - b).max() for (_, a), (_, b) in zip(previews, eager_previews, strict=True)) < 1e-3
    cancel = threading.Event()

    def on_step(event: Any) -> None:
        if event.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        generate(model, request, GenerationHooks(on_step=on_step, cancel=cancel), acceleration="compile")
    assert (stopped.value.step, stopped.value.total) == (2, 6)


def test_an_unknown_acceleration_names_the_field() -> None:
    with pytest.raises(InvalidRequestError) as error:
        compiled.check_acceleration("tensorrt")
    assert error.value.field == "engine_acceleration" and "compile" in str(error.value.allowed)
    with pytest.raises(ValueError, match="positive row counts"):
        compiled.check_buckets([0, 2])
    assert compiled.bucket_for(1, BUCKETS) == 2 and compiled.bucket_for(3, BUCKETS) == 4
    assert compiled.bucket_for(5, BUCKETS) is None
