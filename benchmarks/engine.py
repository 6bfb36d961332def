"""Engine vs diffusers pipelines, side by side in one run: time ratio, pixel parity, NFE, peak memory.

CPU (always): the built-in `shapes` model, 25 DPM-Solver++ steps, CFG 5, batch 1 and 4, txt2img and
img2img (strength 0.6), the same seeds for both; calls are interleaved (ours, theirs, ours, ...) so
both see the same machine state, and the median of the repeats is reported.
CUDA (when a GPU is present): a randomly initialised SD-1.5-sized UNet (+ tiny text encoder and
full-size VAE config) at 512x512 in fp16, torch SDPA vs xformers attention, images/s.

    python benchmarks/engine.py --out benchmarks/results/engine_cpu.json

``--compile``: engine_acceleration = "compile" (engine/compiled.py) vs the eager engine vs diffusers, the
same configurations, interleaved (compiled, eager, diffusers, ...); plus the compile buckets' cold startup
(a fresh process, an empty inductor cache) and warm startup (a fresh process, the cache the cold one wrote):

    nice -n 10 python benchmarks/engine.py --compile --out benchmarks/results/engine_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def startup_seconds(cache_dir: str, unet_rows: list[int], decode_rows: list[int]) -> dict[str, Any]:
    """A fresh process: load `shapes`, build the UNet's and decode's graphs with ``cache_dir`` as inductor's."""
    import subprocess

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    code = ("import json,time,torch; torch.set_num_threads(1); t=time.perf_counter();"
            "from accel_diffusion.models.registry import ModelRegistry;"
            "from accel_diffusion.engine import compiled;"
            "m=ModelRegistry.default().get('shapes'); loaded=time.perf_counter()-t;"
            f"m.compiled_model({tuple(sorted({*unet_rows, *decode_rows}))!r});"
            f"g=compiled.warm(m, unet_rows={unet_rows!r}, decode_rows={decode_rows!r});"
            "print(json.dumps({'load_s': loaded, 'graphs': g, 'total_s': time.perf_counter()-t}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compiled_benchmark(model: Any, directory: str, steps: int, repeats: int, batches: list[int],
                       modes: list[str]) -> dict[str, Any]:
    import tempfile

    from accel_diffusion.engine import compiled

    unet_rows, decode_rows = [2 * b for b in batches], list(batches)  # CFG: two UNet rows per image
    buckets = sorted({*unet_rows, *decode_rows})
    cache = tempfile.mkdtemp(prefix="inductor-")
    cold = startup_seconds(cache, unet_rows, decode_rows)
    warm = startup_seconds(cache, unet_rows, decode_rows)
    compiled.set_cache_dir(cache)
    model.compiled_model(tuple(buckets))
    compiled.warm(model, unet_rows=unet_rows, decode_rows=decode_rows)
    configs = [(b, m) for m in modes for b in batches]
    rows = [compare_compiled(model, directory, b, m, steps, 5.0, repeats)
            for b, m in tqdm(configs, desc="compiled vs eager vs diffusers")]
    return {"buckets": buckets, "cold_start": cold, "warm_start": warm, "rows": rows}


def compiled_markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["compile"]
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads). "
        f"`shapes`, 25 DPM-Solver++ steps, CFG 5; {c['rows'][0]['repeats']} interleaved repeats (compiled, eager, "
        "diffusers) after a warm-up; speedup = median of the paired ratios (diffusers' time / ours).",
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
        s = c[name]
        graphs = ", ".join(f"{g['call'].split(':')[0]} {g['rows']}: {g['seconds']:.1f} s" for g in s["graphs"])
        lines.append(f"\n{name.replace('_', ' ')} (fresh process, buckets {c['buckets']}): load "
                     f"{s['load_s']:.1f} s, total {s['total_s']:.1f} s ({graphs})")
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
    args = parser.parse_args()
    if args.peak_rss:
        _one_call_peak_rss(args.peak_rss, args.mode, args.batch, args.steps)
        return
    registry = ModelRegistry.default()
    model = registry.get("shapes")
    directory = model.spec.location()
    if args.compile:
        torch.set_num_threads(1)
        result = {"benchmark": "engine_compile", "model": "shapes", "machine": machine(),
                  "compile": compiled_benchmark(model, directory, args.steps, args.repeats,
                                                [int(b) for b in args.batches.split(",")], args.modes.split(","))}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(compiled_markdown(result))
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
