"""The CUDA checks no test here can run (#25 item 8), as one prepared script that writes JSON.

    python benchmarks/gpu_checks.py --out DIR              # a CUDA machine: about 3-5 minutes on one H200
    python benchmarks/gpu_checks.py --out DIR --cpu-smoke  # the same checks at tiny sizes on the CPU (a test runs it)

Checks, each recorded with ``ok`` and its numbers in DIR/gpu_checks.json (a check that raises is recorded with its
error and the others still run; the exit status is 1 when any check is not ok):

1. ``batch_invariance``: with ``batch_invariant`` on, every image of a batch of 2..8 is bit-identical to the same
   request alone, on the shipped `shapes` model in float32 and float16 and on a randomly initialised SD-1.5-sized
   UNet in float16; each model loaded with SDPA, and again loaded with xformers when it is installed (the mode then
   runs SDPA: ``attention_run``). A lone request is also run twice (run-to-run determinism, which the comparison
   needs). Without the mode the batch's largest difference to the lone runs is recorded for comparison.
2. ``oom_recovery``: a real CUDA out-of-memory (a forward pre-hook keeps 60% of the free memory in a local and then
   asks for more than is left) inside a job, inside a batch of two jobs, and inside a stream frame, all through the
   server's ``DeviceWorker``: the job fails as ``gpu_oom``, the batch's jobs are run again alone and succeed, the
   frame raises what the stream answers as ``gpu_oom``; after each, the worker's reserved CUDA memory is back within
   256 MiB of where it started (the 60% block was freed and the cache emptied), and the next job / frame is served.
   On the CPU the hook raises ``torch.OutOfMemoryError`` itself and the memory numbers are null.
3. ``fp16_generation``: the engine vs diffusers' own pipeline at equal NFE (DPM-Solver++ 2M, CFG, same seeds) in
   float16, on `shapes` (4 images, 25 steps) and on the SD-1.5-sized random UNet at 512x512 (2 images, 25 steps):
   NFE, PSNR and largest pixel difference between the two, NaNs, seconds per call (median of 3), peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from accel_diffusion.server.jobs import Job, JobStatus
from accel_diffusion.server.metrics import ServerMetrics
from accel_diffusion.server.worker import DeviceWorker, out_of_memory

from accel_diffusion.engine import Engine, generate
from accel_diffusion.engine.attention import xformers_available
from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.models.registry import ModelRegistry, ModelSpec
from accel_diffusion.registry import get_registry
from accel_diffusion.strategy import GenerationRequest
from accel_diffusion.stream import StreamSession

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background",
           "a white cross on a green background", "a purple square on an orange background"]
STRATEGY = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 5.0}}
MEMORY_SLACK = 256 * 2**20  # reserved CUDA memory allowed above the worker's starting point after a recovery


class Plan:
    """The sizes one mode runs at."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.half = torch.float32 if smoke else torch.float16  # the CPU smoke keeps float32: same code path
        self.batch_sizes = [2, 3] if smoke else list(range(2, 9))
        self.invariance_steps = 2 if smoke else 8
        self.sd_size = "tiny" if smoke else "sd15"
        self.sd_resolution = 32 if smoke else 512
        self.sd_invariance_resolution = 32 if smoke else 256
        self.sd_batch_sizes = [2] if smoke else [2, 4]
        self.generation_steps = 2 if smoke else 25
        self.repeats = 1 if smoke else 3


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
            "xformers": xformers_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def shapes_spec(plan: Plan, dtype: torch.dtype, attention: str) -> ModelSpec:
    spec = ModelRegistry.default().spec("shapes")
    return spec.model_copy(update={"id": f"shapes-{attention}-{str(dtype)[6:]}", "device": str(plan.device),
                                   "dtype": str(dtype)[6:], "attention": attention})


_RANDOM_SD: dict[str, tempfile.TemporaryDirectory[str]] = {}  # size -> the saved pipeline (built once a run)


def random_sd(plan: Plan, dtype: torch.dtype, attention: str, resolution: int) -> ModelSpec:
    """A randomly initialised SD pipeline (saved once, to a temporary directory, in float32): SD 1.5's UNet and VAE
    configs (860M + 84M parameters, a 2-layer text encoder), or a tiny one for the CPU smoke."""
    if plan.sd_size not in _RANDOM_SD:
        directory = tempfile.TemporaryDirectory(prefix="gpu_checks_sd_")
        _save_random_sd(plan, directory.name)
        _RANDOM_SD[plan.sd_size] = directory
    return ModelSpec(id="sd-random", source="local", path=_RANDOM_SD[plan.sd_size].name, device=str(plan.device),
                     dtype=str(dtype)[6:], attention=attention, default_steps=25, default_width=resolution,
                     default_height=resolution, default_strategy=STRATEGY)


def _save_random_sd(plan: Plan, directory: str) -> None:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from accel_diffusion.models.shapes.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    if plan.sd_size == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
        hidden = 768
    else:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=32)
        hidden = 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=hidden // 64 or 2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)


def attentions() -> list[str]:
    return ["sdpa", "xformers"] if xformers_available() else ["sdpa"]


def request(model: LoadedPipeline, prompts: list[str], steps: int, size: int | None = None) -> GenerationRequest:
    extra = {"width": size, "height": size} if size else {}
    return GenerationRequest.create(model=model.model_id, prompt=prompts, steps=steps, strategy=STRATEGY, **extra)


def invariance(model: LoadedPipeline, sizes: list[int], steps: int, size: int | None = None) -> dict[str, Any]:
    """Every image of batches of ``sizes`` vs the same request alone, bit for bit, in the batch-invariant mode."""
    count = max(sizes)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    seeds = [100 + i for i in range(count)]
    alone = [generate(model, request(model, [prompts[i]], steps, size), seeds=[seeds[i]], batch_invariant=True)
             for i in range(count)]
    again = generate(model, request(model, [prompts[0]], steps, size), seeds=[seeds[0]], batch_invariant=True)
    rows = {}
    for k in sizes:
        batch = generate(model, request(model, prompts[:k], steps, size), seeds=seeds[:k], batch_invariant=True)
        plain = generate(model, request(model, prompts[:k], steps, size), seeds=seeds[:k])
        rows[str(k)] = {
            "mismatched_images": [i for i in range(k) if not np.array_equal(batch.images[i], alone[i].images[0])],
            "max_abs_diff": max(float(np.abs(batch.images[i] - alone[i].images[0]).max()) for i in range(k)),
            "plain_max_abs_diff": max(float(np.abs(plain.images[i] - alone[i].images[0]).max()) for i in range(k)),
            "attention_run": batch.attention_backend,
        }
    repeatable = bool(np.array_equal(again.images, alone[0].images))
    return {"attention_loaded": model.attention_backend, "dtype": str(model.dtype), "steps": steps,
            "alone_repeatable": repeatable, "batches": rows,
            "ok": repeatable and all(not r["mismatched_images"] and r["attention_run"] == "sdpa"
                                     for r in rows.values())}


def check_batch_invariance(plan: Plan) -> dict[str, Any]:
    runs = []
    for attention in attentions():
        for dtype in (torch.float32, plan.half):
            model = load_pipeline(shapes_spec(plan, dtype, attention))
            runs.append({"model": "shapes", **invariance(model, plan.batch_sizes, plan.invariance_steps)})
            del model
            if dtype == plan.half:
                break
        model = load_pipeline(random_sd(plan, plan.half, attention, plan.sd_invariance_resolution))
        runs.append({"model": f"random {plan.sd_size} UNet at {plan.sd_invariance_resolution}px",
                     **invariance(model, plan.sd_batch_sizes, 4, plan.sd_invariance_resolution)})
        del model
        release_cuda()
    return {"runs": runs, "ok": all(run["ok"] for run in runs)}


def release_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomTrigger:
    """A forward pre-hook that, when armed and ``fails(sample)``, runs the device out of memory for real (CUDA: keep
    60% of the free memory in a local, then ask for more than is left); on the CPU it raises the same error type."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.armed = False
        self.fails: Callable[[torch.Tensor], bool] = lambda sample: True
        self.fired = 0

    def arm(self, fails: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.fails = fails or (lambda sample: True)
        self.armed = True

    def __call__(self, module: object, args: tuple[torch.Tensor, ...]) -> None:
        if not self.armed or not self.fails(args[0]):
            return
        self.armed = False
        self.fired += 1
        if self.device.type != "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (CPU smoke: raised by the check, nothing allocated)")
        free, _ = torch.cuda.mem_get_info(self.device)
        held = torch.empty(int(free * 0.6), dtype=torch.uint8, device=self.device)
        torch.empty(int(free * 0.6), dtype=torch.uint8, device=self.device)  # more than is left: OutOfMemoryError
        del held


def wait(jobs: list[Job], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(job.status.finished for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.01)


def check_oom_recovery(plan: Plan) -> dict[str, Any]:
    spec = shapes_spec(plan, plan.half, "sdpa")
    registry = ModelRegistry([spec])
    worker = DeviceWorker(Engine(registry, limits=None), queue_max=8, metrics=ServerMetrics(), max_batch_size=2,
                          max_batch_wait_ms=3000)
    model = registry.get(spec.id)
    trigger = OomTrigger(plan.device)
    handle = model.pipeline.unet.register_forward_pre_hook(trigger)

    def reserved() -> int | None:  # read on the worker's thread, after what it ran before
        if plan.device.type != "cuda":
            return None
        return worker.run_soon(lambda: torch.cuda.memory_reserved(plan.device)).result(timeout=60)

    def job(seed: int) -> Job:
        return Job(request=GenerationRequest.create(model=spec.id, prompt=PROMPTS[seed % 4], seed=seed, steps=10))

    def recovered(before: int | None, after: int | None) -> bool:
        return before is None or after is None or after <= before + MEMORY_SLACK

    worker.start()
    result: dict[str, Any] = {}
    try:
        warm = job(0)
        worker.submit(warm)
        wait([warm])
        start = reserved()
        # a job
        trigger.arm()
        failed, after = job(1), job(2)
        worker.submit(failed)
        wait([failed])
        memory = reserved()
        worker.submit(after)
        wait([after])
        result["job"] = {"failed_code": (failed.error or {}).get("code"), "next_job": after.status.value,
                         "reserved_start": start, "reserved_after": memory,
                         "ok": (failed.error or {}).get("code") == "gpu_oom" and after.status is JobStatus.SUCCEEDED
                         and recovered(start, memory)}
        # a batch of two jobs (2 x (uncond, cond) rows): run again one by one
        fired = trigger.fired
        trigger.arm(lambda sample: sample.shape[0] > 2)
        pair = [job(3), job(4)]
        for queued in pair:
            worker.submit(queued)
        wait(pair)
        memory = reserved()
        result["batch"] = {"statuses": [j.status.value for j in pair], "fired": trigger.fired - fired,
                           "batch_size_used": [(j.result or {}).get("batch_size_used") for j in pair],
                           "reserved_after": memory,
                           "ok": all(j.status is JobStatus.SUCCEEDED for j in pair) and recovered(start, memory)
                           and [(j.result or {}).get("batch_size_used") for j in pair] == [1, 1]}
        # a stream frame, through the same worker path as the server's WS /v1/stream
        session = worker.run_soon(lambda: StreamSession(model, PROMPTS[0], seed=3)).result(timeout=120)
        frame = np.full((session.height, session.width, 3), 128, dtype=np.uint8)
        for _ in range(session.num_slots):  # warm the stream batch up
            worker.run_soon(lambda: session(frame)).result(timeout=120)
        trigger.arm()
        try:
            worker.run_soon(lambda: session(frame)).result(timeout=120)
            code = None
        except Exception as exc:  # what the stream answers the client (server/stream.py: _Connection.failed)
            code = "gpu_oom" if out_of_memory(exc) else "internal_error"
        memory = reserved()
        output = worker.run_soon(lambda: session(frame)).result(timeout=120)
        result["stream"] = {"failed_code": code, "next_frame_shape": None if output is None else list(output.shape),
                            "reserved_after": memory,
                            "ok": code == "gpu_oom" and output is not None and recovered(start, memory)}
    finally:
        handle.remove()
        worker.stop(timeout=120)
    result["ok"] = all(part["ok"] for part in result.values() if isinstance(part, dict))
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of images in [0, 1], capped at 100 (identical images; JSON has no infinity); None with NaNs."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if not np.isfinite(mse) else (100.0 if mse <= 1e-10 else min(100.0, 10 * np.log10(1.0 / mse)))


def versus_diffusers(model: LoadedPipeline, prompts: list[str], steps: int, size: int, repeats: int) -> dict[str, Any]:
    """The engine and diffusers' StableDiffusionPipeline on the same model files, scheduler, seeds and CFG."""
    from diffusers import StableDiffusionPipeline

    seeds = list(range(len(prompts)))
    scale = STRATEGY["guidance"]["scale"]
    reference = StableDiffusionPipeline.from_pretrained(model.spec.location(), local_files_only=True,
                                                        dtype=model.dtype).to(model.device)
    reference.set_progress_bar_config(disable=True)
    sampler = get_registry().build("sampler", STRATEGY["sampler"])
    reference.scheduler = sampler.make_scheduler(model.scheduler_config, {})
    rows: list[int] = []
    counter = reference.unet.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))

    def ours() -> Any:
        return generate(model, GenerationRequest.create(model=model.model_id, prompt=prompts, steps=steps, width=size,
                                                        height=size, strategy=STRATEGY), seeds=seeds)

    def theirs() -> np.ndarray:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return reference(prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators, height=size,
                         width=size, output_type="np").images

    def timed(fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        out = fn()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else None
        return out, time.perf_counter() - begin, peak

    engine_result, _, _ = timed(ours)
    diffusers_images, _, _ = timed(theirs)
    counter.remove()
    engine_times, diffusers_times, engine_peak, diffusers_peak = [], [], None, None
    for _ in range(repeats):
        _, t, engine_peak = timed(ours)
        engine_times.append(t)
        _, t, diffusers_peak = timed(theirs)
        diffusers_times.append(t)
    ours_images = engine_result.images
    nans = {"engine": int(np.isnan(ours_images).sum()), "diffusers": int(np.isnan(diffusers_images).sum())}
    value = psnr(ours_images, diffusers_images)
    return {"dtype": str(model.dtype), "size": size, "images": len(prompts), "steps": steps,
            "nfe_engine": engine_result.nfe, "nfe_diffusers": sum(rows) // len(prompts),
            "psnr_db": value, "max_abs_pixel_diff": float(np.nanmax(np.abs(ours_images - diffusers_images))),
            "nans": nans, "engine_s": statistics.median(engine_times),
            "diffusers_s": statistics.median(diffusers_times),
            "peak_cuda_mem_gb_engine": None if engine_peak is None else engine_peak / 2**30,
            "peak_cuda_mem_gb_diffusers": None if diffusers_peak is None else diffusers_peak / 2**30,
            "attention": engine_result.attention_backend,
            "ok": nans["engine"] == 0 and engine_result.nfe == sum(rows) // len(prompts)
            and (nans["diffusers"] > 0 or (value is not None and value >= 30.0))}


def check_fp16_generation(plan: Plan) -> dict[str, Any]:
    runs = []
    model = load_pipeline(shapes_spec(plan, plan.half, "auto"))
    runs.append({"model": "shapes", **versus_diffusers(model, PROMPTS, plan.generation_steps, model.default_size[0],
                                                       plan.repeats)})
    del model
    release_cuda()
    model = load_pipeline(random_sd(plan, plan.half, "auto", plan.sd_resolution))
    runs.append({"model": f"random {plan.sd_size} UNet", **versus_diffusers(
        model, PROMPTS[:2], plan.generation_steps, plan.sd_resolution, plan.repeats)})
    del model
    release_cuda()
    return {"runs": runs, "ok": all(run["ok"] for run in runs)}


CHECKS: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "batch_invariance": check_batch_invariance,
    "oom_recovery": check_oom_recovery,
    "fp16_generation": check_fp16_generation,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_checks.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same checks at tiny sizes on the CPU")
    parser.add_argument("--only", choices=list(CHECKS), action="append", help="run these checks only")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; --cpu-smoke runs the checks at tiny sizes on the CPU")
    plan = Plan(args.cpu_smoke)
    if plan.smoke:  # model work runs on this thread and the worker's: one thread each, no idle OpenMP team spinning
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "cpu-smoke" if plan.smoke else "cuda", "machine": machine(), "checks": {}}
    begin = time.perf_counter()
    for name in args.only or list(CHECKS):
        started = time.perf_counter()
        print(f"[gpu_checks] {name} ...", flush=True)
        try:
            entry = CHECKS[name](plan)
        except Exception as exc:  # recorded; the other checks still run
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        report["checks"][name] = entry
        print(f"[gpu_checks] {name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s", flush=True)
        (out / "gpu_checks.json").write_text(json.dumps(report, indent=2) + "\n")  # kept if a later check hangs
    report["seconds"] = round(time.perf_counter() - begin, 2)
    report["ok"] = all(entry["ok"] for entry in report["checks"].values())
    for directory in _RANDOM_SD.values():
        directory.cleanup()
    _RANDOM_SD.clear()
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2) + "\n")
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if threads:
        print(f"[gpu_checks] threads still running: {threads}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
