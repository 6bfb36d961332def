"""Rank processes for the patch-parallel tests: gloo on CPU, one thread each.

Two models: ``tiny``, a random-weight UNet at a 32 x 32 latent (parity and byte counts), and ``shapes``,
the built-in trained UNet with its text encoder at a 16 x 16 latent (fidelity of the displaced modes).
Every rank builds the same model and inputs, runs the engine's ``denoise`` loop (DDIM, CFG 5) through
a ``PatchParallelUNet`` in each mode and saves what it got; rank 0 also saves the single-process reference.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.loop import denoise
from accel_diffusion.parallel import PatchParallelUNet
from accel_diffusion.registry import get_registry

LATENT = 32  # rows and columns of the tiny latent: 8 rows per rank at N = 4, 4 at the attention's 16 x 16 level
TEXT_TOKENS, TEXT_DIM = 8, 32
SHAPES = Path(__file__).resolve().parents[1] / "accel_diffusion" / "models" / "builtin" / "shapes"
SHAPES_LATENT = 16  # 128 x 128 pixels: 4 rows per rank at N = 4 (2 at the attention's level)
SHAPES_PROMPT = "a red circle on a blue background"


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def tiny_inputs() -> tuple[torch.Tensor, Conditioning]:
    generator = torch.Generator().manual_seed(1234)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    cond = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)
    uncond = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)
    return latents, Conditioning({"cond": {"encoder_hidden_states": cond},
                                  "uncond": {"encoder_hidden_states": uncond}})


@torch.no_grad()
def shapes_model() -> tuple[UNet2DConditionModel, Conditioning]:
    tokenizer = AutoTokenizer.from_pretrained(SHAPES / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(SHAPES / "text_encoder").eval()
    ids = tokenizer([SHAPES_PROMPT, ""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    cond, uncond = encoder(ids)[0].chunk(2)
    conditioning = Conditioning({"cond": {"encoder_hidden_states": cond}, "uncond": {"encoder_hidden_states": uncond}})
    return UNet2DConditionModel.from_pretrained(SHAPES / "unet").eval(), conditioning


def model_and_inputs(name: str) -> tuple[UNet2DConditionModel, torch.Tensor, Conditioning]:
    if name == "tiny":
        return (tiny_unet(), *tiny_inputs())
    unet, conditioning = shapes_model()
    latents = torch.randn(1, 4, SHAPES_LATENT, SHAPES_LATENT, generator=torch.Generator().manual_seed(7))
    return unet, latents, conditioning


def sample(model: torch.nn.Module, steps: int, latents: torch.Tensor | None = None,
           conditioning: Conditioning | None = None) -> torch.Tensor:
    if latents is None or conditioning is None:
        latents, conditioning = tiny_inputs()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    scheduler.set_timesteps(steps)
    guidance = get_registry().build("guidance", {"name": "cfg", "scale": 5.0})
    return denoise(model, latents, scheduler, scheduler.timesteps, guidance, conditioning)


def one_call(model: torch.nn.Module) -> torch.Tensor:
    """One UNet call on the noise at t = 500 with the CFG batch (B = 2)."""
    latents, conditioning = tiny_inputs()
    kwargs = conditioning.model_kwargs(("cond", "uncond"))
    with torch.no_grad():
        return model(torch.cat([latents, latents]), torch.tensor(500), **kwargs, return_dict=False)[0]


Plan = list[tuple[str, int, list[tuple[str, dict[str, Any]]]]]  # (model, steps, [(label, runtime kwargs)])


def run_rank(rank: int, world: int, port: int, plan: Plan, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result: dict[str, Any] = {}
        for model_name, steps, runs in plan:
            unet, latents, conditioning = model_and_inputs(model_name)
            result[model_name] = results = {}
            if rank == 0:
                if model_name == "tiny":
                    results["reference_call"] = one_call(unet)
                results["reference"] = sample(unet, steps, latents, conditioning)
            for label, kwargs in runs:
                runtime = PatchParallelUNet(unet, **kwargs)
                if model_name == "tiny":
                    results[label] = {"call": one_call(runtime), "call_stats": runtime.stats.summary()}
                    runtime.begin_generation()
                start = time.perf_counter()
                output = sample(runtime, steps, latents, conditioning)
                results.setdefault(label, {}).update(output=output, stats=runtime.stats.summary(),
                                                     seconds=time.perf_counter() - start)
                runtime.detach()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world: int, plan: Plan, out: Path, timeout: float = 400.0) -> list[dict[str, Any]]:
    """Run ``world`` ranks to completion (killing them all past ``timeout`` seconds); each rank's results."""
    context = mp.start_processes(run_rank, args=(world, free_port(), plan, str(out)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks running {plan} did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
