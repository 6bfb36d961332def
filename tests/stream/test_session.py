"""Stream batch equals per-frame sequential denoising; NFE per guidance mode; warm-up; updates; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.loading import LoadedPipeline
from accel_diffusion.stream import StreamSession

PROMPT = "a red circle on a blue background"
STEPS = (20, 32, 45)


def frames(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def sequential_estimate(session: StreamSession, frame: Image.Image) -> torch.Tensor:
    """One frame denoised on its own through the session's steps and fixed noise (the definition)."""
    unet, n = session.model.pipeline.unet, session.num_slots
    alpha, sigma, noise = session._alpha, session._sigma, session.init_noise
    clean = session._encode(session._frame_tensor(frame))
    x = alpha[0] * clean + sigma[0] * noise[0:1]
    reference = clean
    for i in range(n):
        t = session.timesteps[i : i + 1]
        eps_c = unet(x, t, encoder_hidden_states=session._cond, return_dict=False)[0]
        if session.guidance == "cfg":
            eps_u = unet(x, t, encoder_hidden_states=session._uncond, return_dict=False)[0]
            eps = eps_u + session.guidance_scale * (eps_c - eps_u)
        elif session.guidance == "none":
            eps = eps_c
        else:
            if session.guidance == "rcfg_onetime" and i == 0:
                eps_neg = unet(x, t, encoder_hidden_states=session._uncond, return_dict=False)[0]
                reference = (x - sigma[0] * eps_neg) / alpha[0]
            residual = session.delta * (x - alpha[i] * reference) / sigma[i]
            eps = residual + session.guidance_scale * (eps_c - residual)
        estimate = (x - sigma[i] * eps) / alpha[i]
        if i < n - 1:
            x = alpha[i + 1] * estimate + sigma[i + 1] * noise[i + 1 : i + 2]
    return estimate


@pytest.mark.parametrize("guidance", ["none", "cfg", "rcfg_self", "rcfg_onetime"])
def test_stream_batch_equals_sequential_denoising_of_each_frame(shapes_model: LoadedPipeline, guidance: str) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=STEPS, guidance=guidance, guidance_scale=1.5,
                            delta=0.8, seed=3)
    inputs = frames(6)
    for k, frame in enumerate(inputs):
        out = session(frame)
        if k < len(STEPS) - 1:
            assert out is None  # warm-up: the first n - 1 calls show nothing
            continue
        with torch.no_grad():
            expected = sequential_estimate(session, inputs[k - (len(STEPS) - 1)])
        # a batch of n rows vs one row: float32 GEMM blocking differs, ~1e-5 relative after n UNet calls (this
        # machine's CPU: 1.2e-5 at a value of 1.26 in the RCFG modes, which 1e-5 absolute alone refused)
        torch.testing.assert_close(session.state.last_estimate, expected, rtol=2e-5, atol=1e-5)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(("guidance", "rows"), [("none", 3), ("cfg", 6), ("rcfg_self", 3), ("rcfg_onetime", 4)])
def test_one_unet_call_per_frame_with_the_guidance_modes_nfe(shapes_model: LoadedPipeline, guidance: str,
                                                            rows: int) -> None:
    batches: list[int] = []
    handle = shapes_model.pipeline.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        session = StreamSession(shapes_model, PROMPT, t_index_list=STEPS, guidance=guidance)
        for frame in frames(4):
            session(frame)
    finally:
        handle.remove()
    assert batches == [rows] * 4  # n, 2n, n, n + 1 evaluations in one call per frame
    assert session.stats()["nfe_per_processed_frame"] == rows


def test_updates_mid_stream(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="none")
    inputs = frames(5)
    session(inputs[0])
    first = session(inputs[1])
    session.update(prompt="a white cross on a green background")
    changed = session(inputs[1])
    assert changed is not None and not np.array_equal(first, changed)  # no warm-up again for a prompt
    session.update(t_index_list=(20, 32, 45))
    assert session(inputs[2]) is None and session(inputs[3]) is None and session(inputs[4]) is not None
    with pytest.raises(InvalidRequestError) as error:
        session.update(t_index_list=(45, 32))
    assert error.value.field == "t_index_list"


def test_compiled_sessions_equal_eager_ones_and_build_their_graph_before_the_first_frame(
        shapes_model: LoadedPipeline) -> None:
    """acceleration="compile": the same frames as the eager UNet; a UNet batch's graph is built in the
    background when the session is made or its number of steps changes, and shared by the model's
    sessions (and its engine requests: ``LoadedPipeline.compiled_model``)."""
    from torch._dynamo.utils import counters

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    inputs = frames(5)
    eager = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=2)
    before = graphs()
    compiled = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=2,
                             acceleration="compile")
    unet = shapes_model.compiled_model().unet
    assert compiled._unet is unet and compiled.wait_for_graphs(timeout=900) and graphs() > before
    built, eager_calls = graphs(), unet.stats.eager_calls
    encoder = compiled._encoder  # the frame's encode is a graph too, built with the session's
    assert encoder is shapes_model.compiled_model().encoder(compiled._vae) and len(encoder.ready) >= 1
    encodes = encoder.stats.compiled_calls, encoder.stats.eager_calls
    for frame in inputs[:3]:
        expected, out = eager(frame), compiled(frame)
        if expected is not None:
            torch.testing.assert_close(compiled.state.last_estimate, eager.state.last_estimate, rtol=0, atol=1e-5)
            assert np.abs(out.astype(int) - expected).max() <= 1
    assert graphs() == built and unet.stats.eager_calls == eager_calls  # the frames ran the graph built ahead
    assert (encoder.stats.compiled_calls, encoder.stats.eager_calls) == (encodes[0] + 3, encodes[1])
    again = StreamSession(shapes_model, PROMPT, t_index_list=(20, 45), guidance="rcfg_self", acceleration="compile")
    assert again.wait_for_graphs(timeout=900) and graphs() == built and again(inputs[0]) is None  # reused
    compiled.update(t_index_list=(45,)), eager.update(t_index_list=(45,))
    assert compiled.wait_for_graphs(timeout=900) and graphs() > built  # one row per call now: built by the update
    built, eager_calls = graphs(), unet.stats.eager_calls
    for frame in inputs[3:]:
        expected, out = eager(frame), compiled(frame)
        torch.testing.assert_close(compiled.state.last_estimate, eager.state.last_estimate, rtol=0, atol=1e-5)
    assert graphs() == built and unet.stats.eager_calls == eager_calls


def test_a_failed_update_changes_nothing(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=3)
    twin = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=3)
    inputs = frames(4)
    session(inputs[0]), twin(inputs[0])
    before = (session.t_index_list, session.init_noise.clone(), session._cond.clone(), session.guidance_scale)
    bad_updates = [
        {"prompt": "a white cross", "t_index_list": [10.0, 20.0, 40.0]},  # floats are not indices
        {"guidance_scale": 2.0, "seed": 1.5},
        {"prompt": "", "delta": 0.5},
        {"negative_prompt": 3},
        {"guidance_scale": "abc"},
        {"delta": float("nan")},
        {"seed": -1},
        {"strength": 0.02},
    ]
    for update in bad_updates:
        with pytest.raises(InvalidRequestError):
            session.update(**update)
    after = (session.t_index_list, session.init_noise, session._cond, session.guidance_scale)
    assert after[0] == before[0] and all(torch.equal(a, b) for a, b in zip(after[1:3], before[1:3], strict=True))
    assert after[3] == before[3] and session.delta == 1.0 and session._prompt == PROMPT
    for frame in inputs[1:]:  # the buffered frame survived: outputs equal an untouched twin's
        assert np.array_equal(session(frame), twin(frame))


@pytest.mark.parametrize(("field", "value"), [
    ("guidance_scale", "abc"), ("delta", -1.0), ("seed", 2**64), ("seed", "3"), ("width", -64), ("width", 34),
    ("width", 16384), ("height", 4096), ("mode", "foo"), ("similarity_threshold", -0.1),
    ("similarity_threshold", 1.5), ("max_skip", -1), ("t_index_list", "32"), ("t_index_list", [True]),
    ("acceleration", "tensorrt"),
])
def test_invalid_session_parameters_name_their_field(shapes_model: LoadedPipeline, field: str, value: object) -> None:
    options = {"similarity_threshold": 0.9} if field == "max_skip" else {}
    with pytest.raises(InvalidRequestError) as error:
        StreamSession(shapes_model, PROMPT, **{**options, field: value})
    assert error.value.field == field or (field == "height" and error.value.field == "width")


def test_prompts_that_cannot_be_encoded_are_refused_naming_the_field(shapes_model: LoadedPipeline) -> None:
    for prompt, negative, field in (("a red \ud800 circle", None, "prompt"), (PROMPT, "\udcff", "negative_prompt")):
        with pytest.raises(InvalidRequestError) as error:
            StreamSession(shapes_model, prompt, negative_prompt=negative, t_index_list=[45], guidance="none")
        assert error.value.field == field and "unpaired UTF-16 surrogate" in error.value.message
    session = StreamSession(shapes_model, PROMPT, t_index_list=[45], guidance="none")
    with pytest.raises(InvalidRequestError) as error:
        session.update(prompt="a white \udc80 cross")
    assert error.value.field == "prompt" and session._prompt == PROMPT  # the session is as it was


def test_strength_is_diffusers_img2img_strength_on_the_grid(shapes_model: LoadedPipeline) -> None:
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from accel_diffusion.stream import strength_t_index_list

    components = {k: v for k, v in shapes_model.pipeline.components.items()
                  if k in ("vae", "text_encoder", "tokenizer", "unet")}
    scheduler = DDIMScheduler.from_config(shapes_model.pipeline.scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionImg2ImgPipeline(**components, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler.set_timesteps(50)
    for strength in (0.3, 0.5, 0.74, 1.0):
        steps = int(50 * strength)  # diffusers runs this many of its 50 steps
        session = StreamSession(shapes_model, PROMPT, t_index_list=range(steps), strength=strength)
        expected, count = pipe.get_timesteps(50, strength, "cpu")
        assert count == steps and session.timesteps.tolist() == expected.tolist()
    assert strength_t_index_list(0.3, 1) == [35] and strength_t_index_list(0.7, 2) == [15, 32]
    assert strength_t_index_list(0.7, 4) == [15, 23, 32, 41]
    for bad in (0.0, 1.5, "high", True):
        with pytest.raises(InvalidRequestError):
            strength_t_index_list(bad, 1)
    with pytest.raises(InvalidRequestError, match="fewer than"):
        strength_t_index_list(0.05, 3)  # 2 grid steps left for 3 slots


def test_strength_updates_keep_the_steps_count_and_the_seed(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="none", seed=7)
    noise = session.init_noise.clone()
    session.update(strength=0.5)
    assert session.t_index_list == [25, 37] and torch.equal(session.init_noise, noise)
    with pytest.raises(InvalidRequestError) as error:
        session.update(strength=0.5, t_index_list=(10, 20))
    assert error.value.field == "strength"
    with pytest.raises(InvalidRequestError):
        StreamSession(shapes_model, PROMPT, mode="txt2img", guidance="none", strength=0.5)


def test_malformed_frames_are_refused_and_the_session_goes_on(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(45,), guidance="none")
    good = frames(1)[0]
    assert session(good) is not None
    for bad in (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), None):
        with pytest.raises(InvalidRequestError):
            session(bad)
    assert session(good) is not None


def test_txt2img_stream_and_its_guidance_limits(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, guidance="none", mode="txt2img")
    assert session.t_index_list == [0, 16, 32, 45]  # StreamDiffusion's txt2img default: from pure noise
    assert StreamSession(shapes_model, PROMPT, guidance="none").t_index_list == [32, 45]  # img2img's
    outputs = [session() for _ in range(5)]
    assert outputs[:3] == [None] * 3 and outputs[3] is not None and np.array_equal(outputs[3], outputs[4])
    with pytest.raises(InvalidRequestError) as error:
        StreamSession(shapes_model, PROMPT, guidance="rcfg_self", mode="txt2img")
    assert error.value.field == "guidance"


def test_filtered_frames_cost_no_unet_call(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(45,), guidance="none",
                            similarity_threshold=0.9, max_skip=10)
    still = frames(1)[0]
    outputs = [session(still) for _ in range(33)]
    stats = session.stats()
    assert stats["skipped"] == 30 and stats["unet_calls"] == 3  # processed, then 10 skips, forced, ...
    assert all(np.array_equal(o, outputs[0]) for o in outputs)


def test_the_filter_never_skips_a_warm_up_frame_and_an_update_shows_at_once(shapes_model: LoadedPipeline) -> None:
    session = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="none",
                            similarity_threshold=0.5, max_skip=10)
    still = frames(1)[0]
    first = [session(still) for _ in range(2)]  # a still scene: skip probability 1 once there is a reference
    assert first[0] is None and first[1] is not None  # the warm-up frame filled its slot; the next one is shown
    assert session.stats()["skipped"] == 0
    session(still)
    assert session.state.last_frame.skipped
    session.update(prompt="a white cross on a green background")
    session(still)  # the new prompt is processed at once, not after up to max_skip replays of the old output
    assert not session.state.last_frame.skipped and session.state.last_frame.unet_calls == 1


def test_tiny_autoencoder_by_default_and_close_to_the_full_vae(shapes_model: LoadedPipeline) -> None:
    from dataclasses import replace

    from diffusers import AutoencoderKL, AutoencoderTiny

    from accel_diffusion.eval.image_stats import psnr_per_image

    tiny = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=1)
    full = StreamSession(shapes_model, PROMPT, t_index_list=(32, 45), guidance="rcfg_self", seed=1, vae="full")
    assert tiny.vae == "tiny" and isinstance(tiny._vae, AutoencoderTiny)
    assert full.vae == "full" and isinstance(full._vae, AutoencoderKL)
    clip = [np.asarray(f) for f in frames(1, seed=9)] * 3  # a still input: both settle on one picture
    tiny_out = [tiny(f) for f in clip][-1]
    full_out = [full(f) for f in clip][-1]
    # the two autoencoders share one latent space: the same frames give nearly the same picture
    assert psnr_per_image(full_out[None], tiny_out[None])[0] > 20.0
    without = replace(shapes_model, tiny_vae=None)
    assert StreamSession(without, PROMPT).vae == "full"
    with pytest.raises(InvalidRequestError) as error:
        StreamSession(without, PROMPT, vae="tiny")
    assert error.value.field == "vae"
    with pytest.raises(InvalidRequestError):
        StreamSession(shapes_model, PROMPT, vae="taesd")
