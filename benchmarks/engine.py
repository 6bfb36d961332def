"""Engine vs diffusers pipelines, side by side in one run: time ratio, pixel parity, NFE, peak memory.

CPU (always): the built-in `shapes` model, 25 DPM-Solver++ steps, CFG 5, batch 1 and 4, txt2img and
img2img (strength 0.6), the same seeds for both; calls are interleaved (ours, theirs, ours, ...) so
both see the same machine state, and the median of the repeats is reported.
CUDA (when a GPU is present): a randomly initialised SD-1.5-sized UNet (+ tiny text encoder and
full-size VAE config) at 512x512 in fp16, torch SDPA vs xformers attention, images/s.

    python benchmarks/engine.py --out benchmarks/results/engine_cpu.json

``--compile``: the server's cold startup with its default settings (compile on a CPU: every bucket of
``compile_buckets`` built before ready) from an empty inductor cache, and its warm startup from the cache the
cold one wrote; the stream's 1-step WebSocket loop on that compiled-by-default server (and on an eager one)
against the eager compute floor; the server's overhead p50 with compile on; then engine_acceleration =
"compile" (engine/compiled.py) vs the eager engine vs diffusers, the same configurations, interleaved
(compiled, eager, diffusers, ...):

    nice -n 10 python benchmarks/engine.py --compile --repeats 5 --out benchmarks/results/engine_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from tqdm import tqdm

from accel_diffusion.engine import generate
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.registry import get_registry
from accel_diffusion.strategy import GenerationRequest

PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a white cross on a green background",
    "a purple square on an orange background",
]


class PeakMemory:
    """Peak allocated CUDA memory during a block (CPU peaks are measured in fresh processes instead)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_image() -> Image.Image:
    yy, xx = np.mgrid[0:32, 0:32]
    circle = ((xx - 16) ** 2 + (yy - 16) ** 2 < 64)[..., None]
    return Image.fromarray(np.where(circle, [200, 40, 40], [40, 40, 200]).astype(np.uint8))


def compare(model: Any, directory: str, batch: int, mode: str, steps: int, scale: float, repeats: int) -> dict:
    """Time ours vs diffusers on identical inputs; returns medians, ratio, parity, NFE, memory."""
    sampler = {"name": "dpmpp_2m"}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    init = _init_image() if mode == "img2img" else None
    request = GenerationRequest.create(
        model=model.model_id, prompt=prompts, seed=0, steps=steps, init_image=init, strength=0.6,
        strategy={"sampler": sampler, "guidance": {"name": "cfg", "scale": scale}},
    )
    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionPipeline
    reference = cls.from_pretrained(directory, local_files_only=True, dtype=model.dtype).to(model.device)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = get_registry().build("sampler", sampler).make_scheduler(model.scheduler_config, {})
    size = model.default_size

    def ours() -> tuple[np.ndarray, int]:
        result = generate(model, request)
        return result.images, result.nfe

    def ours_cold() -> tuple[np.ndarray, int]:
        model.prompt_encoder.clear()  # isolates the loop: the text encoder runs on every call, as in diffusers
        return ours()

    def theirs() -> np.ndarray:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = {"image": init, "strength": 0.6} if init is not None else {"height": size[1], "width": size[0]}
        return reference(prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                         output_type="np", **kwargs).images

    # Count diffusers' UNet calls (batched, x2 rows for CFG) the same way we count ours.
    rows = []
    hook = reference.unet.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    ours_images, nfe = ours()
    theirs_images = theirs()
    hook.remove()
    theirs_nfe = sum(rows) // batch
    for _ in range(2):  # warm-up
        ours()
        theirs()
    times_ours, times_cold, times_theirs = [], [], []
    for _ in range(repeats):
        for fn, bucket in ((ours, times_ours), (theirs, times_theirs), (ours_cold, times_cold)):
            _sync(model.device)
            start = time.perf_counter()
            fn()
            _sync(model.device)
            bucket.append(time.perf_counter() - start)
    t_ours, t_theirs = statistics.median(times_ours), statistics.median(times_theirs)
    # Each (ours, theirs) pair ran back to back, so their ratio cancels the machine's slow drift.
    paired_ratio = statistics.median(a / b for a, b in zip(times_ours, times_theirs))
    paired_ratio_cold = statistics.median(a / b for a, b in zip(times_cold, times_theirs))
    return {
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "guidance_scale": scale,
        "engine_s": t_ours,
        "diffusers_s": t_theirs,
        "time_ratio": paired_ratio,
        "time_ratio_cold_prompt_cache": paired_ratio_cold,
        "engine_cold_s": statistics.median(times_cold),
        "ratio_of_medians": t_ours / t_theirs,
        "ratio_of_minimums": min(times_ours) / min(times_theirs),
        "saved_ms_per_call": (t_theirs - t_ours) * 1000,
        "images_per_s_engine": batch / t_ours,
        "images_per_s_diffusers": batch / t_theirs,
        "max_abs_pixel_diff": float(np.abs(ours_images - theirs_images).max()),
        "nfe_engine": nfe,
        "nfe_diffusers": theirs_nfe,
        "peak_rss_mb_engine": peak_rss_of_fresh_process("engine", mode, batch, steps),
        "peak_rss_mb_diffusers": peak_rss_of_fresh_process("diffusers", mode, batch, steps),
        "repeats": repeats,
        "engine_s_all": times_ours,
        "diffusers_s_all": times_theirs,
    }


def compare_compiled(model: Any, directory: str, batch: int, mode: str, steps: int, scale: float,
                     repeats: int) -> dict:
    """Compiled engine vs eager engine vs diffusers on identical inputs, interleaved; medians and paired ratios."""
    sampler = {"name": "dpmpp_2m"}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    init = _init_image() if mode == "img2img" else None
    request = GenerationRequest.create(
        model=model.model_id, prompt=prompts, seed=0, steps=steps, init_image=init, strength=0.6,
        strategy={"sampler": sampler, "guidance": {"name": "cfg", "scale": scale}})
    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionPipeline
    reference = cls.from_pretrained(directory, local_files_only=True, dtype=model.dtype).to(model.device)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = get_registry().build("sampler", sampler).make_scheduler(model.scheduler_config, {})
    size = model.default_size

    def theirs() -> np.ndarray:
        generators = [torch.Generator("cpu").manual_seed(s) for s in range(batch)]
        kwargs = {"image": init, "strength": 0.6} if init is not None else {"height": size[1], "width": size[0]}
        return reference(prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                         output_type="np", **kwargs).images

    runs = {"compiled": lambda: generate(model, request, acceleration="compile").images,
            "eager": lambda: generate(model, request).images, "diffusers": theirs}
    images = {name: fn() for name, fn in runs.items()}
    unet = model.compiled_model().unet
    eager_calls = unet.stats.eager_calls
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(model.device)
            start = time.perf_counter()
            fn()
            _sync(model.device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "mode": mode, "batch": batch, "steps": steps, "guidance_scale": scale,
        **{f"{name}_s": median[name] for name in runs},
        "speedup_vs_diffusers": statistics.median(b / a for a, b in zip(times["compiled"], times["diffusers"])),
        "speedup_vs_eager": statistics.median(b / a for a, b in zip(times["compiled"], times["eager"])),
        "eager_speedup_vs_diffusers": statistics.median(b / a for a, b in zip(times["eager"], times["diffusers"])),
        "max_abs_pixel_diff_vs_eager": float(np.abs(images["compiled"] - images["eager"]).max()),
        "unet_eager_calls_while_timed": unet.stats.eager_calls - eager_calls,  # 0: every call ran a graph
        "repeats": repeats, "all_s": times,
    }


GRAPH_LINE = re.compile(r"compiled shapes (\S+) graph of (\d+) rows in ([\d.]+) s")
STREAM_LINE = re.compile(r"compiled shapes's (stream) session graphs in ([\d.]+) s")


def start_compiled_server(cache_dir: str, log_path: Path, **settings: str | None) -> dict[str, Any]:
    """``accel-diffusion serve`` with its default acceleration (compile on a CPU: every bucket of
    ``compile_buckets`` built at startup, and the default stream session's graphs) and ``cache_dir`` as its
    inductor cache; the seconds from launch to ready, and the graphs its log says it built."""
    from serving import free_port, start_server

    port = free_port()
    begin = time.perf_counter()
    with log_path.open("w") as log:
        process = start_server(port, queue_max=8, ready_timeout_s=3600, log=log, engine_acceleration=None,
                               inductor_cache_dir=cache_dir, **settings)
    seconds = time.perf_counter() - begin
    text = log_path.read_text()
    graphs = [{"call": m[1], "rows": int(m[2]), "seconds": float(m[3])} for m in GRAPH_LINE.finditer(text)]
    graphs += [{"call": "stream session (UNet 2 rows, tiny decode)", "rows": 1, "seconds": float(m[2])}
               for m in STREAM_LINE.finditer(text)]
    ready = re.search(r"ready in ([\d.]+) s", text)
    return {"process": process, "port": port, "launch_to_ready_s": seconds, "graphs": graphs,
            "server_ready_s": float(ready[1]) if ready else None,
            "acceleration_log": [line for line in text.splitlines() if "engine_acceleration" in line]}


STREAM_IN_FLIGHT = {"": 1, "_two_in_flight": 2}  # row name suffix -> frames the client keeps in flight


def stream_rounds(model: Any, urls: dict[str, str], rounds: int, frames: int = 200) -> dict[str, Any]:
    """The 1-step WebSocket loop (tiny autoencoder, JPEG, ``frames`` timed frames) against each server in ``urls``
    with one frame in flight (the web page's loop) and with two (the next frame sent before the previous
    answer arrives), round-robin, with the eager compute floor (UNet batch 1 + tiny encode + tiny decode, in
    this process, on one thread as the servers) measured at the start of every round; medians."""
    import asyncio

    from stream import clip, compute_floor, websocket_frames

    samples: dict[str, list[dict[str, float]]] = {name + suffix: [] for name in urls for suffix in STREAM_IN_FLIGHT}
    for _ in range(rounds):
        floor = compute_floor(model, clip(8))
        for name, url in urls.items():
            for suffix, in_flight in STREAM_IN_FLIGHT.items():
                row = asyncio.run(websocket_frames(url, clip(frames + 5), "tiny", in_flight))
                row["floor_fps"] = floor["floor_fps_1_step_tiny_vae"]
                row["vs_eager_floor"] = row["fps"] / row["floor_fps"]
                samples[name + suffix].append(row)
    return {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"rounds": len(rows)}
            for name, rows in samples.items()}


def compiled_benchmark(model: Any, directory: str, steps: int, repeats: int, batches: list[int],
                       modes: list[str], rounds: int, blocks: int, out: Path,
                       cache_dir: str | None = None, servers_only: bool = False,
                       stream_frames: int = 200) -> dict[str, Any]:
    """Cold and warm server startup (the default settings, an empty then the same inductor cache); the
    stream's WebSocket loop on the warm compiled server and on an eager one against the eager floor; the
    server overhead p50 with compile on; then compiled vs eager vs diffusers rows. Partial results are
    written to ``out`` after each stage."""
    import tempfile

    from serving import overhead

    from accel_diffusion.engine import Engine, compiled

    result: dict[str, Any] = {"load_average_start": os.getloadavg()}
    # the servers run on one torch thread as this process does: the same kernels (inductor builds them for a
    # thread count), so that this process's graphs load from the cache the servers wrote
    os.environ["OMP_NUM_THREADS"] = "1"

    def save() -> None:
        out.write_text(json.dumps({"benchmark": "engine_compile", "model": "shapes", "machine": machine(),
                                   "compile": result}, indent=2) + "\n")

    cache = cache_dir or tempfile.mkdtemp(prefix="inductor-")  # another run's: only the warm start is measured
    logs = Path(tempfile.mkdtemp(prefix="compile-bench-"))
    result["inductor_cache_dir"], result["server_logs"] = cache, str(logs)
    servers = []
    try:
        for name in ("cold_start", "warm_start") if cache_dir is None else ("warm_start",):
            started = start_compiled_server(cache, logs / f"{name}.log")
            result[name] = {k: v for k, v in started.items() if k not in ("process", "port")} | {
                "load_average": os.getloadavg()}
            print(name, json.dumps(result[name]), flush=True)
            if name == "cold_start":
                started["process"].terminate()
                started["process"].wait(120)
            else:
                servers.append(started["process"])
                compiled_port = started["port"]
        save()
        from serving import free_port, start_server

        eager_port = free_port()
        servers.append(start_server(eager_port, queue_max=8, engine_acceleration="none"))
        result["stream"] = stream_rounds(model, {"compiled_default": f"http://127.0.0.1:{compiled_port}",
                                                 "eager": f"http://127.0.0.1:{eager_port}"}, rounds,
                                       stream_frames)
        result["stream"]["load_average"] = os.getloadavg()
        print("stream", json.dumps(result["stream"]), flush=True)
        save()
        compiled.set_cache_dir(cache)  # this process's graphs load from the cache the servers wrote
        begin = time.perf_counter()
        model.compiled_model(compiled.DEFAULT_BUCKETS)
        result["in_process_warm"] = {"graphs": compiled.warm(model), "seconds": time.perf_counter() - begin}
        engine = Engine(_single_model_registry(model), acceleration="compile")
        result["server_overhead"] = overhead(compiled_port, blocks, engine=engine) | {
            "load_average": os.getloadavg()}
        print("overhead", json.dumps(result["server_overhead"]), flush=True)
        # the same measurement on the eager server beside it: what the machine's state costs either way
        result["server_overhead_eager"] = overhead(eager_port, blocks, engine=Engine(
            _single_model_registry(model))) | {"load_average": os.getloadavg()}
        print("overhead eager", json.dumps(result["server_overhead_eager"]), flush=True)
        save()
    finally:
        for server in servers:
            server.terminate()
            server.wait(120)
    if servers_only:
        return result
    configs = [(b, m) for m in modes for b in batches]
    result["rows"] = []
    for b, m in tqdm(configs, desc="compiled vs eager vs diffusers"):
        result["rows"].append(compare_compiled(model, directory, b, m, steps, 5.0, repeats))
        save()
    result["buckets"] = list(compiled.DEFAULT_BUCKETS)
    result["load_average_end"] = os.getloadavg()
    save()
    return result


def _single_model_registry(model: Any) -> Any:
    """A registry that serves the already loaded (and compiled) ``model``."""
    registry = ModelRegistry([model.spec])
    registry._loaded[model.model_id] = model
    return registry


def compiled_markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["compile"]
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads). "
        f"`shapes`, 25 DPM-Solver++ steps, CFG 5; {c['rows'][0]['repeats']} interleaved repeats (compiled, eager, "
        "diffusers) after a warm-up; speedup = median of the paired ratios (diffusers' time / ours). Load average "
        f"{c['load_average_start'][0]:.1f} at the start, {c['load_average_end'][0]:.1f} at the end.",
        "",
        "| mode | batch | compiled ms | eager ms | diffusers ms | compiled vs diffusers (target >= 1.3 at batch 1) "
        "| compiled vs eager | eager vs diffusers | max abs pixel diff vs eager | eager UNet calls while timed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['compiled_s'] * 1000:.1f} | {r['eager_s'] * 1000:.1f} "
            f"| {r['diffusers_s'] * 1000:.1f} | **{r['speedup_vs_diffusers']:.2f}x** | {r['speedup_vs_eager']:.2f}x "
            f"| {r['eager_speedup_vs_diffusers']:.2f}x | {r['max_abs_pixel_diff_vs_eager']:.1e} "
            f"| {r['unet_eager_calls_while_timed']} |")
    for name in ("cold_start", "warm_start"):
        if name not in c:  # --cache-dir: no cold start
            continue
        s = c[name]
        graphs = ", ".join(f"{g['call'].split(':')[-1]} {g['rows']}: {g['seconds']:.1f} s" for g in s["graphs"])
        lines.append(f"\n{name.replace('_', ' ')} of `accel-diffusion serve` (default settings, buckets "
                     f"{c['buckets']}): {s['launch_to_ready_s']:.1f} s from launch to ready, load average "
                     f"{s['load_average'][0]:.1f} ({graphs})")
    st, o = c["stream"], c["server_overhead"]
    fast, eager = st["compiled_default"], st["eager"]
    lines.append(
        f"\nstream, `WS /v1/stream`, 1 step, tiny autoencoder, {fast['rounds']} rounds: compiled (server default) "
        f"{fast['fps']:.1f} fps = **{fast['vs_eager_floor']:.2f}x** the eager compute floor ({fast['floor_fps']:.1f} "
        f"fps; target >= 1.0), p50 {fast['latency_p50_ms']:.1f} ms; eager server {eager['fps']:.1f} fps = "
        f"{eager['vs_eager_floor']:.2f}x")
    if "compiled_default_two_in_flight" in st:
        fast2, eager2 = st["compiled_default_two_in_flight"], st["eager_two_in_flight"]
        lines.append(
            f"\nthe same with two frames in flight (the next frame sent before the previous answer arrives): "
            f"compiled {fast2['fps']:.1f} fps = **{fast2['vs_eager_floor']:.2f}x** the floor, p50 "
            f"{fast2['latency_p50_ms']:.1f} ms, {fast2['dropped']:.0f} dropped; eager server {eager2['fps']:.1f} fps = "
            f"{eager2['vs_eager_floor']:.2f}x")
    lines.append(f"\nserver overhead with compile on (8 steps, HTTP p50 minus the compiled engine's p50 in the "
                 f"benchmark process): **{o['overhead_ms']:.2f} ms** (target <= 2 ms); HTTP minus the server's "
                 f"own compute p50 {o['http_minus_server_compute_p50_ms']:.2f} ms; HTTP p50 {o['http_p50_ms']:.1f} ms")
    if "raw_overhead_ms" in o:
        lines.append(f"\nthe same from a plain socket (no client library, as wrk or ab measure): "
                     f"**{o['raw_overhead_ms']:.2f} ms**; HTTP minus the server's own compute p50 "
                     f"{o['raw_http_minus_server_compute_p50_ms']:.2f} ms")
    if "server_overhead_eager" in c:
        e = c["server_overhead_eager"]
        lines.append(f"\nthe eager server beside it: {e['overhead_ms']:.2f} ms; HTTP minus the server's own compute "
                     f"p50 {e['http_minus_server_compute_p50_ms']:.2f} ms")
    return "\n".join(lines) + "\n"


def peak_rss_of_fresh_process(runner: str, mode: str, batch: int, steps: int) -> float:
    """Peak resident memory (MB) of a new process that loads `shapes` and makes one call."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--peak-rss", runner, "--mode", mode, "--batch", str(batch), "--steps", str(steps)],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _one_call_peak_rss(runner: str, mode: str, batch: int, steps: int) -> None:
    import resource

    model = ModelRegistry.default().get("shapes")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    init = _init_image() if mode == "img2img" else None
    if runner == "engine":
        generate(model, GenerationRequest.create(
            model="shapes", prompt=prompts, seed=0, steps=steps, init_image=init, strength=0.6,
            strategy={"sampler": {"name": "dpmpp_2m"}, "guidance": {"name": "cfg", "scale": 5.0}}))
    else:
        cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionPipeline
        pipe = cls.from_pretrained(model.spec.location(), local_files_only=True, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = get_registry().build("sampler", {"name": "dpmpp_2m"}).make_scheduler(
            model.scheduler_config, {})
        kwargs = {"image": init, "strength": 0.6} if init is not None else {}
        pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
             generator=[torch.Generator().manual_seed(s) for s in range(batch)], **kwargs)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cuda_attention_benchmark(repeats: int) -> list[dict]:
    """SD-1.5-sized random UNet at 512x512, fp16: SDPA vs xformers (when installed), images/s."""
    import tempfile

    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from accel_diffusion.models.loading import load_pipeline
    from accel_diffusion.models.registry import ModelSpec
    from accel_diffusion.models.shapes.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 1.5's UNet config (860M parameters), random weights
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
    )
    vae = AutoencoderKL(  # SD's VAE config
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        for attention in ("sdpa", "xformers"):
            spec = ModelSpec(id="sd15-random", source="local", path=tmp, device="cuda", dtype="float16",
                             attention=attention, default_steps=25,
                             default_strategy={"sampler": "dpmpp_2m", "schedule": "spacing",
                                               "guidance": {"name": "cfg", "scale": 7.5}})
            model = load_pipeline(spec)
            if attention == "xformers" and model.attention_backend != "xformers":
                rows.append({"attention": "xformers", "skipped": "xformers not installed"})
                continue
            for batch in (1, 4):
                request = GenerationRequest.create(model="sd15-random", prompt=["a photo"] * batch, seed=0,
                                                   steps=25, width=512, height=512)
                generate(model, request)
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    generate(model, request)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                with PeakMemory(model.device) as mem:
                    generate(model, request)
                t = statistics.median(times)
                rows.append({"attention": model.attention_backend, "batch": batch, "seconds": t,
                             "images_per_s": batch / t, "peak_cuda_mem_gb": mem.peak / 2**30})
            del model
            torch.cuda.empty_cache()
    return rows


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    import diffusers

    info["diffusers"] = diffusers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for one result file."""
    m = result["machine"]
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"diffusers {m['diffusers']}, Python {m['python']}. {result['cpu'][0]['repeats']} interleaved repeats "
        "(ours, diffusers, ours with its prompt cache cleared, ...) after 2 warm-ups, same seeds for both; time "
        "ratio = median of the paired ratios (robust to the machine's drift), ms = medians.",
        "",
        "| mode | batch | engine ms | diffusers ms | time ratio (target <= 1.0) | ratio, cold prompt cache "
        "| ratio of minimums | max abs pixel diff "
        "| NFE engine / diffusers | peak RSS MB engine / diffusers (fresh process: load + 1 call) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cpu"]:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['engine_s'] * 1000:.1f} | {r['diffusers_s'] * 1000:.1f} "
            f"| **{r['time_ratio']:.3f}** | {r['time_ratio_cold_prompt_cache']:.3f} | {r['ratio_of_minimums']:.3f} "
            f"| {r['max_abs_pixel_diff']:.1e} "
            f"| {r['nfe_engine']} / {r['nfe_diffusers']} "
            f"| {r['peak_rss_mb_engine']:.0f} / {r['peak_rss_mb_diffusers']:.0f} |"
        )
    if "cuda" in result:
        lines += ["", f"CUDA ({m.get('gpu', '?')}), SD-1.5-sized random UNet, 512x512, fp16, 25 steps, CFG 7.5:", "",
                  "| attention | batch | s/call | images/s | peak CUDA GB |", "|---|---|---|---|---|"]
        for r in result["cuda"]:
            if "skipped" in r:
                lines.append(f"| {r['attention']} | - | - | - | skipped: {r['skipped']} |")
            else:
                lines.append(f"| {r['attention']} | {r['batch']} | {r['seconds']:.3f} | {r['images_per_s']:.2f} "
                             f"| {r['peak_cuda_mem_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/engine_cpu.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--peak-rss", choices=["engine", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="txt2img", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help="compiled engine rows and startup times instead")
    parser.add_argument("--batches", default="1,4", help="with --compile: batch sizes")
    parser.add_argument("--modes", default="txt2img,img2img", help="with --compile: txt2img, img2img")
    parser.add_argument("--rounds", type=int, default=3, help="with --compile: stream WebSocket rounds")
    parser.add_argument("--blocks", type=int, default=4, help="with --compile: server overhead blocks of 10")
    parser.add_argument("--cache-dir", default=None, help="with --compile: inductor cache (default: a new, empty one)")
    parser.add_argument("--servers-only", action="store_true", help="with --compile: no compiled/eager/diffusers rows")
    parser.add_argument("--stream-frames", type=int, default=200, help="with --compile: timed frames per stream row")
    args = parser.parse_args()
    if args.peak_rss:
        _one_call_peak_rss(args.peak_rss, args.mode, args.batch, args.steps)
        return
    registry = ModelRegistry.default()
    model = registry.get("shapes")
    directory = model.spec.location()
    if args.compile:
        torch.set_num_threads(1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        compiled_benchmark(model, directory, args.steps, args.repeats, [int(b) for b in args.batches.split(",")],
                           args.modes.split(","), args.rounds, args.blocks, out, args.cache_dir, args.servers_only,
                           args.stream_frames)
        if not args.servers_only:
            print(compiled_markdown(json.loads(out.read_text())))
        return
    rows = []
    configs = [(b, m) for m in ("txt2img", "img2img") for b in (1, 4)]
    for batch, mode in tqdm(configs, desc="engine vs diffusers"):
        rows.append(compare(model, directory, batch, mode, args.steps, 5.0, args.repeats))
    result = {"benchmark": "engine", "model": "shapes", "machine": machine(), "cpu": rows}
    if torch.cuda.is_available():
        result["cuda"] = cuda_attention_benchmark(max(3, args.repeats // 2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
