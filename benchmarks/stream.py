"""Stream benchmark on the built-in `shapes` model (32x32): StreamSession vs per-frame img2img.

    python benchmarks/stream.py --out benchmarks/results/stream_cpu.json

In one run, for t_index_lists of 1, 2 and 4 steps:
- the compute floor: UNet (batch 1) + VAE encode + VAE decode time for one frame, as fps;
- diffusers' StableDiffusionImg2ImgPipeline called per frame with the same number of UNet calls
  (strength = steps / 50, prompt embeddings precomputed), with CFG 1.2 (batch 2 per call) and
  without guidance;
- StreamSession fps with RCFG self (1.2), CFG (1.2) and no guidance;
and the similarity filter on a static clip (fraction of frames skipped, fps); and end to end over
the WebSocket (a server in its own process, the SDK's StreamClient, one frame in flight: send,
await the result, send the next) at 1 step: fps, p50/p95 frame latency, and the ratio to the
compute floor. Frames come from a moving synthetic clip (a disc crossing the frame); fps counts
frames after the warm-up.
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


@torch.no_grad()
def compute_floor(model: Any, frames: list[Image.Image]) -> dict[str, float]:
    session = StreamSession(model, PROMPT, t_index_list=[45], guidance="none")
    pixels = session._frame_tensor(frames[0])
    latent = session._encode(pixels)
    unet, vae = model.pipeline.unet, model.pipeline.vae
    timings: dict[str, list[float]] = {"unet_ms": [], "encode_ms": [], "decode_ms": []}
    for _ in range(10):  # warm the kernels and the CPU up first
        unet(latent, session.timesteps[:1], encoder_hidden_states=session._cond)
        vae.decode(latent / vae.config.scaling_factor)
    for _ in range(100):
        begin = time.perf_counter()
        unet(latent, session.timesteps[:1], encoder_hidden_states=session._cond)
        timings["unet_ms"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        session._encode(pixels)
        timings["encode_ms"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        vae.decode(latent / vae.config.scaling_factor)
        timings["decode_ms"].append(time.perf_counter() - begin)
    result = {k: 1e3 * statistics.median(v) for k, v in timings.items()}
    result["floor_fps_1_step"] = 1e3 / sum(result.values())
    return result


async def websocket_loopback(frames: list[Image.Image]) -> dict[str, float]:
    from accel_diffusion.clients import StreamClient
    from serving import free_port, start_server

    port = free_port()
    server = start_server(port, queue_max=8)
    try:
        async with StreamClient(f"http://127.0.0.1:{port}", PROMPT, t_index_list=[45], guidance="none",
                                output_format="jpeg") as stream:
            encoded = []
            for frame in frames:
                buffer = io.BytesIO()
                frame.save(buffer, format="JPEG", quality=90)
                encoded.append(buffer.getvalue())
            latencies = []
            for k, data in enumerate(encoded):
                if k == 5:
                    begin = time.perf_counter()
                sent = time.perf_counter()
                await stream.send(data)
                await stream.receive()
                if k >= 5:
                    latencies.append(1e3 * (time.perf_counter() - sent))
            wall = time.perf_counter() - begin
    finally:
        server.terminate()
        server.wait(60)
    return {"frames": len(latencies), "fps": len(latencies) / wall,
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/stream_cpu.json")
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    model = ModelRegistry.default().get("shapes")
    frames = clip(args.frames + 8)
    result: dict[str, Any] = {"benchmark": "stream", "model": "shapes", "frames": args.frames, "machine": machine(),
                              "floor": compute_floor(model, frames)}
    pipe = StableDiffusionImg2ImgPipeline(**{k: v for k, v in model.pipeline.components.items()
                                             if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = pipe.encode_prompt(PROMPT, model.device, 1, True, "")
    for steps, indices in STEP_LISTS.items():
        row: dict[str, float] = {}
        for label, scale in (("diffusers_img2img_cfg", 1.2), ("diffusers_img2img_no_guidance", 1.0)):
            def img2img(frame: Image.Image, scale: float = scale, steps: int = steps) -> Any:
                return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, image=frame,
                            strength=steps / 50, num_inference_steps=50, guidance_scale=scale, output_type="np")
            row[label] = fps_of(img2img, frames, 2)
        for guidance in ("rcfg_self", "cfg", "none"):
            session = StreamSession(model, PROMPT, t_index_list=indices, guidance=guidance, guidance_scale=1.2)
            row[f"stream_{guidance}"] = fps_of(session, frames, len(indices) + 1)
        row["stream_rcfg_self_vs_diffusers_cfg"] = row["stream_rcfg_self"] / row["diffusers_img2img_cfg"]
        row["stream_none_vs_diffusers_no_guidance"] = row["stream_none"] / row["diffusers_img2img_no_guidance"]
        row["rcfg_self_vs_cfg"] = row["stream_rcfg_self"] / row["stream_cfg"]
        result[f"{steps}_steps"] = row
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
    result["websocket_1_step"] = asyncio.run(websocket_loopback(frames))
    result["websocket_1_step"]["vs_floor"] = (result["websocket_1_step"]["fps"]
                                              / result["floor"]["floor_fps_1_step"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
