"""Stream benchmark on the built-in `shapes` model (32x32): StreamSession vs per-frame img2img.

    python benchmarks/stream.py --out benchmarks/results/stream_cpu.json

In one run, for t_index_lists of 1, 2 and 4 steps:
- the compute floor: UNet (batch 1) + VAE encode + VAE decode time for one frame, as fps, with the
  pipeline's VAE and with the tiny TAESD-style autoencoder (`shapes_tiny_vae`);
- diffusers' StableDiffusionImg2ImgPipeline called per frame with the same number of UNet calls
  (strength = steps / 50, prompt embeddings precomputed), with CFG 1.2 (batch 2 per call) and
  without guidance;
- StreamSession fps with RCFG self (1.2), CFG (1.2) and no guidance, each with the full and the tiny
  autoencoder; and the ceiling of RCFG-self over CFG on this hardware: UNet time at batch 2n over n;
- the same three stream configurations with the tiny autoencoder and ``acceleration="compile"``
  (torch.compile, static shapes; graphs built before timing, their build time recorded), and the
  compute floor with the compiled UNet;
- RCFG self vs CFG again on 128x128 frames (32x32 latents) at 4 steps, where the UNet is compute-bound;
and the similarity filter on a static clip (fraction of frames skipped, fps); and end to end over
the WebSocket (a server in its own process, the SDK's StreamClient, one frame in flight: send,
await the result, send the next) at 1 step: fps, p50/p95 frame latency, and the ratio to the
compute floor, with each autoencoder, and with the tiny one and a compiled UNet (round-robin rounds,
each with the floor measured just before it; medians over rounds).
Frames come from a moving synthetic clip (a disc crossing the frame); fps counts
frames after the warm-up, each figure the median of ``--rounds`` rounds interleaved with the other
configurations of its row.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine.engine import _decode
from accel_diffusion.eval.timing import median_ms
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.stream import StreamSession

PROMPT = "a red circle on a blue background"
STEP_LISTS = {1: [45], 2: [32, 45], 4: [18, 26, 35, 45]}


def clip(count: int, moving: bool = True) -> list[Image.Image]:
    frames = []
    for k in range(count):
        image = Image.new("RGB", (32, 32), (30, 40, 200))
        x = 4 + (k % 20) if moving else 10
        ImageDraw.Draw(image).ellipse([x, 8, x + 12, 20], fill=(220, 30, 30))
        frames.append(image)
    return frames


def fps_of(step: Any, frames: list[Image.Image], warmup: int) -> float:
    for frame in frames[:warmup]:
        step(frame)
    begin = time.perf_counter()
    for frame in frames[warmup:]:
        step(frame)
    return (len(frames) - warmup) / (time.perf_counter() - begin)


def fps_interleaved(steppers: dict[str, Any], frames: list[Image.Image], warmup: int, rounds: int) -> dict[str, float]:
    """fps of each stepper, measured in ``rounds`` round-robin rounds (each on the whole clip), the
    median per stepper: a slow spell of the machine lands on every configuration, not on one."""
    for step in steppers.values():
        for frame in frames[:warmup]:
            step(frame)
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            samples[name].append(fps_of(step, frames, 0))
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def _codec_ms(model: Any, frame: Image.Image, vae_kind: str) -> dict[str, float]:
    session = StreamSession(model, PROMPT, t_index_list=[45], guidance="none", vae=vae_kind)
    pixels = session._frame_tensor(frame)
    latent = session._encode(pixels)
    result = {f"encode_ms_{vae_kind}_vae": median_ms(lambda: session._encode(pixels)),
              f"decode_ms_{vae_kind}_vae": median_ms(lambda: _decode(model, latent, session._vae))}
    if vae_kind == "full":
        result["unet_ms"] = median_ms(lambda: model.pipeline.unet(latent, session.timesteps[:1],
                                                                   encoder_hidden_states=session._cond))
    return result


@torch.no_grad()
def compute_floor(model: Any, frames: list[Image.Image]) -> dict[str, float]:
    """UNet (batch 1) + encode + decode of one frame, with the pipeline's VAE and with the tiny one."""
    result: dict[str, float] = {}
    for vae_kind in ("full", "tiny"):
        result.update(_codec_ms(model, frames[0], vae_kind))
    for vae_kind in ("full", "tiny"):
        total = result["unet_ms"] + result[f"encode_ms_{vae_kind}_vae"] + result[f"decode_ms_{vae_kind}_vae"]
        result[f"floor_fps_1_step_{vae_kind}_vae"] = 1e3 / total
    return result


@torch.no_grad()
def compiled_unet_ms(model: Any) -> float:
    """The compiled UNet's time for one frame's 1-step call, shaped as a session makes it."""
    session = StreamSession(model, PROMPT, t_index_list=[45], guidance="none", acceleration="compile")
    session.wait_for_graphs()  # built in the background: time the graph, not the eager fallback
    x = torch.zeros_like(session.init_noise)
    return median_ms(lambda: session._eps(x, [0], session._cond.expand(1, -1, -1)))


LOOPBACKS = (("full", "none"), ("tiny", "none"), ("tiny", "compile"))


def websocket_rounds(model: Any, frames: list[Image.Image], rounds: int) -> dict[str, dict[str, Any]]:
    """Each loopback configuration ``rounds`` times, round-robin, with the (eager) compute floor measured
    at the start of every round: fps, latencies and each round's fps / floor are medians over rounds.
    Runs before anything compiled has run in this process: the idle OpenMP threads of compiled kernels
    take CPU from the server process beside it (measured: 51 instead of 75-80 fps on the tiny path)."""
    samples: dict[str, list[dict[str, float]]] = {}
    for _ in range(rounds):
        floor = compute_floor(model, frames)
        for vae, acceleration in LOOPBACKS:
            name = f"websocket_1_step_{vae}_vae{'_compiled' if acceleration == 'compile' else ''}"
            row = asyncio.run(websocket_loopback(clip(205), vae, acceleration))  # 200 timed frames
            row["vs_floor_full_vae"] = row["fps"] / floor["floor_fps_1_step_full_vae"]
            if vae == "tiny":
                row["vs_floor_tiny_vae"] = row["fps"] / floor["floor_fps_1_step_tiny_vae"]
            samples.setdefault(name, []).append(row)
    return {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"rounds": len(rows)}
            for name, rows in samples.items()}


@torch.no_grad()
def unet_batch_ratio(model: Any, rows: int, latent_size: int = 8) -> float:
    """UNet time at batch 2n over batch n: what RCFG-self (n rows) can at most gain over CFG (2n rows)
    when the UNet were the whole frame."""
    session = StreamSession(model, PROMPT, t_index_list=[45], guidance="none")
    unet, cond = model.pipeline.unet, session._cond
    latent = torch.randn(rows, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    timesteps = session.timesteps[:1].repeat(rows)
    single = median_ms(lambda: unet(latent, timesteps, encoder_hidden_states=cond.expand(rows, -1, -1)))
    double = median_ms(lambda: unet(torch.cat([latent, latent]), timesteps.repeat(2),
                                     encoder_hidden_states=cond.expand(2 * rows, -1, -1)))
    return double / single


async def websocket_loopback(frames: list[Image.Image], vae: str, acceleration: str = "none") -> dict[str, float]:
    from serving import free_port, start_server

    port = free_port()
    server = start_server(port, queue_max=8, stream_acceleration=acceleration)
    try:
        return await websocket_frames(f"http://127.0.0.1:{port}", frames, vae)
    finally:
        server.terminate()
        server.wait(60)


async def websocket_frames(url: str, frames: list[Image.Image], vae: str, in_flight: int = 1) -> dict[str, float]:
    """A 1-step img2img session on the server at ``url`` with ``in_flight`` frames sent and not yet answered
    (1: send, await the answer, send the next, as the web page does; 2: the next frame is sent before the
    previous answer arrives, as a camera that does not wait does); the first 5 frames untimed."""
    from accel_diffusion.clients import StreamClient

    async with StreamClient(url, PROMPT, t_index_list=[45], guidance="none", output_format="jpeg",
                            vae=vae) as stream:
        encoded = []
        for frame in frames:
            buffer = io.BytesIO()
            frame.save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
        sent_at: dict[int, float] = {}
        begin = 0.0

        async def send(k: int) -> None:
            nonlocal begin
            if k == 5:
                begin = time.perf_counter()
            sent_at[k + 1] = time.perf_counter()  # keyed by the server's seq
            await stream.send(encoded[k])

        for k in range(min(in_flight, len(encoded))):
            await send(k)
        latencies, last, following = [], 0, min(in_flight, len(encoded))
        while last < len(encoded):  # until the last frame is answered (a dropped frame is never answered)
            answer = await stream.receive()
            last = answer.seq
            if last > 5:
                latencies.append(1e3 * (time.perf_counter() - sent_at[last]))
            if following < len(encoded):
                await send(following)
                following += 1
        wall = time.perf_counter() - begin
        dropped = (await stream.stats())["dropped"]
    return {"frames": len(latencies), "fps": len(latencies) / wall, "in_flight": in_flight, "dropped": dropped,
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/stream_cpu.json")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per fps figure (median)")
    args = parser.parse_args()
    model = ModelRegistry.default().get("shapes")
    frames = clip(args.frames + 8)
    loopbacks = websocket_rounds(model, frames, args.rounds)  # first: before any compiled kernel runs here
    floor = compute_floor(model, frames)
    floor["unet_ms_compiled"] = compiled_unet_ms(model)
    floor["floor_fps_1_step_tiny_vae_compiled_unet"] = 1e3 / (
        floor["unet_ms_compiled"] + floor["encode_ms_tiny_vae"] + floor["decode_ms_tiny_vae"])
    result: dict[str, Any] = {"benchmark": "stream", "model": "shapes", "frames": args.frames, "machine": machine(),
                              "floor": floor}
    pipe = StableDiffusionImg2ImgPipeline(**{k: v for k, v in model.pipeline.components.items()
                                             if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = pipe.encode_prompt(PROMPT, model.device, 1, True, "")
    for steps, indices in STEP_LISTS.items():
        steppers: dict[str, Any] = {}
        for label, scale in (("diffusers_img2img_cfg", 1.2), ("diffusers_img2img_no_guidance", 1.0)):
            def img2img(frame: Image.Image, scale: float = scale, steps: int = steps) -> Any:
                return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, image=frame,
                            strength=steps / 50, num_inference_steps=50, guidance_scale=scale, output_type="np")
            steppers[label] = img2img
        for vae in ("full", "tiny"):
            for guidance in ("rcfg_self", "cfg", "none"):
                steppers[f"stream_{guidance}_{vae}_vae"] = StreamSession(
                    model, PROMPT, t_index_list=indices, guidance=guidance, guidance_scale=1.2, vae=vae)
        build_s = {}
        for guidance in ("rcfg_self", "cfg", "none"):  # each session builds its UNet graph (new shapes only)
            begin = time.perf_counter()
            steppers[f"stream_{guidance}_tiny_vae_compiled"] = StreamSession(
                model, PROMPT, t_index_list=indices, guidance=guidance, guidance_scale=1.2, vae="tiny",
                acceleration="compile")
            steppers[f"stream_{guidance}_tiny_vae_compiled"].wait_for_graphs()
            build_s[f"compile_s_{guidance}"] = time.perf_counter() - begin
        row: dict[str, float] = fps_interleaved(steppers, frames, len(indices) + 1, args.rounds)
        row.update(build_s)
        for guidance in ("rcfg_self", "cfg", "none"):
            row[f"compiled_vs_eager_{guidance}_tiny_vae"] = (row[f"stream_{guidance}_tiny_vae_compiled"]
                                                             / row[f"stream_{guidance}_tiny_vae"])
        row["rcfg_self_vs_cfg_tiny_vae_compiled"] = (row["stream_rcfg_self_tiny_vae_compiled"]
                                                     / row["stream_cfg_tiny_vae_compiled"])
        for vae in ("full", "tiny"):
            # like for like against diffusers (which decodes with the pipeline's VAE) on the full VAE
            row[f"stream_rcfg_self_{vae}_vae_vs_diffusers_cfg"] = (row[f"stream_rcfg_self_{vae}_vae"]
                                                                  / row["diffusers_img2img_cfg"])
            row[f"stream_cfg_{vae}_vae_vs_diffusers_cfg"] = row[f"stream_cfg_{vae}_vae"] / row["diffusers_img2img_cfg"]
            row[f"stream_none_{vae}_vae_vs_diffusers_no_guidance"] = (row[f"stream_none_{vae}_vae"]
                                                                      / row["diffusers_img2img_no_guidance"])
            row[f"rcfg_self_vs_cfg_{vae}_vae"] = row[f"stream_rcfg_self_{vae}_vae"] / row[f"stream_cfg_{vae}_vae"]
        row["rcfg_self_vs_cfg_ceiling_unet_2n_over_n"] = unet_batch_ratio(model, steps)
        result[f"{steps}_steps"] = row
    # the same comparison where the UNet is compute-bound (as SD at 512x512 is on a GPU): 128x128
    # frames, 32x32 latents, 4 steps; the picture quality there is not the point, the arithmetic is
    large: dict[str, float] = fps_interleaved(
        {f"stream_{guidance}": StreamSession(model, PROMPT, t_index_list=STEP_LISTS[4], guidance=guidance,
                                             guidance_scale=1.2, width=128, height=128)
         for guidance in ("rcfg_self", "cfg")}, clip(65), 5, args.rounds)
    large["rcfg_self_vs_cfg"] = large["stream_rcfg_self"] / large["stream_cfg"]
    large["rcfg_self_vs_cfg_ceiling_unet_2n_over_n"] = unet_batch_ratio(model, 4, latent_size=32)
    result["compute_bound_128px_4_steps"] = large
    static = clip(4 * args.frames, moving=False)  # long enough that the first (processed) frames weigh little
    for label, threshold in (("static_without_filter", None), ("static_with_filter", 0.98)):
        session = StreamSession(model, PROMPT, t_index_list=[32, 45], guidance="rcfg_self",
                                similarity_threshold=threshold)
        fps = fps_of(session, static, 3)
        stats = session.stats()
        result[label] = {"fps": fps, "skipped_fraction": stats["skipped"] / stats["frames"],
                         "unet_calls": stats["unet_calls"], "frames": stats["frames"]}
    result["filter_compute_saved"] = 1 - (result["static_with_filter"]["unet_calls"]
                                          / result["static_without_filter"]["unet_calls"])
    loopbacks["websocket_1_step_tiny_vae_compiled"]["vs_floor_tiny_vae_compiled_unet"] = (
        loopbacks["websocket_1_step_tiny_vae_compiled"]["fps"] / floor["floor_fps_1_step_tiny_vae_compiled_unet"])
    result.update(loopbacks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
