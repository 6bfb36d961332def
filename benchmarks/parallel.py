"""Patch parallelism: fidelity, bytes and wall time on gloo ranks of this CPU, and a latency model for GPUs.

    nice -n 10 python benchmarks/parallel.py --out benchmarks/results/parallel_cpu.json

1. ``shapes`` (the built-in UNet, 128 px = 16 x 16 latent, 25 DDIM steps, CFG 5): N in {1, 2, 4} x the four
   modes, plus a warm-up sweep (distrifusion) and a rho sweep (pcpp). PSNR of the decoded image against
   the single-device one, bytes sent per rank per step (measured, checked against ``volumes.py``), wall time.
2. ``sd15``: a randomly initialised UNet with Stable Diffusion 1.5's configuration (860 M parameters) at a
   32 x 32 latent (256 px), no CFG, 2 DDIM steps at t = 999, 499 (warm-up 0: step 0 synchronous, step 1
   stale) — what this shared CPU affords. The weights are built once and shared by the ranks (shared
   memory). PSNR of the latents (peak: the reference's range), bytes per step, wall time per step.
3. A latency model (no GPU measured here): an SDXL-sized UNet (2.56 B parameters) at 1024 px (128 x 128
   latent, CFG batch 2, fp16), 50 steps: compute per patch from its FLOPs (counted on the meta device) at an
   assumed utilisation of a GPU's dense fp16 peak, communication from the closed-form bytes over a link's
   bandwidth; speed-ups on 4 and 8 GPUs beside the papers' figures. Every assumption is a named constant
   below and is written into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, CLIPTextModel

from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.loop import denoise
from accel_diffusion.parallel import PatchParallelUNet
from accel_diffusion.parallel.volumes import call_bytes, layer_inventory
from accel_diffusion.registry import get_registry

SHAPES = Path(__file__).resolve().parents[1] / "accel_diffusion" / "models" / "builtin" / "shapes"
PROMPT = "a red circle on a blue background"
MODES = ("full_sync", "distrifusion", "pcpp", "naive")
SHAPES_STEPS, SHAPES_LATENT = 25, 16
SD_STEPS, SD_LATENT = 2, 32
WARMUP_SWEEP = (0, 1, 2, 8)  # distrifusion; 4 is the mode row
RHO_SWEEP = (0.25, 1.0)  # pcpp; 0.5 is the mode row

# ---- latency model assumptions (written into the JSON) ------------------------------------------------
GPU = "A100-SXM4-80GB (the GPU of both papers' main results)"
GPU_FP16_DENSE_TFLOPS = 312.0  # NVIDIA A100 datasheet: 312 TFLOPS dense fp16/bf16 tensor core
UTILISATION = 0.4  # assumed achieved fraction of that peak by a UNet step, at every patch size
LINKS_GB_S = {  # bytes per second one GPU can send (one direction)
    "NVLink 3 (A100 SXM: 600 GB/s total, 300 GB/s per direction)": 300.0,
    "PCIe 4.0 x16 (16 GT/s x 16 lanes, ~32 GB/s per direction; 25 GB/s achieved)": 25.0,
}
MODEL_STEPS, MODEL_WARMUP, MODEL_LATENT = 50, 4, 128
PAPERS = {"pcpp": "2.36-8.02x (arXiv 2412.02962)", "distrifusion": "2.32-6.71x (arXiv 2402.19481)"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddim(spacing: str = "leading") -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)


@torch.no_grad()
def shapes_inputs() -> tuple[UNet2DConditionModel, torch.Tensor, Conditioning]:
    tokenizer = AutoTokenizer.from_pretrained(SHAPES / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(SHAPES / "text_encoder").eval()
    ids = tokenizer([PROMPT, ""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    cond, uncond = encoder(ids)[0].chunk(2)
    latents = torch.randn(1, 4, SHAPES_LATENT, SHAPES_LATENT, generator=torch.Generator().manual_seed(7))
    return (UNet2DConditionModel.from_pretrained(SHAPES / "unet").eval(), latents,
            Conditioning({"cond": {"encoder_hidden_states": cond}, "uncond": {"encoder_hidden_states": uncond}}))


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval()


def sd15_inputs() -> tuple[torch.Tensor, Conditioning]:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, SD_LATENT, SD_LATENT, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)
    return latents, Conditioning({"cond": {"encoder_hidden_states": text}})


def sample(model: torch.nn.Module, steps: int, latents: torch.Tensor, conditioning: Conditioning,
           guidance: dict[str, Any]) -> tuple[torch.Tensor, float]:
    # 2 steps: "trailing" (t = 999, 499); "leading" would run t = 500, 0, and DDIM's last step from t = 0 to
    # alphas_cumprod[0] is the identity whatever the model predicts, hiding step 1 (the only stale one)
    scheduler = ddim("trailing" if steps == SD_STEPS else "leading")
    scheduler.set_timesteps(steps)
    start = time.perf_counter()
    with torch.no_grad():
        out = denoise(model, latents, scheduler, scheduler.timesteps, get_registry().build("guidance", guidance),
                      conditioning)
    return out, time.perf_counter() - start


def runs_for(world: int) -> list[tuple[str, dict[str, Any]]]:
    runs = [(mode, {"mode": mode}) for mode in MODES]
    runs += [(f"distrifusion_warmup{w}", {"mode": "distrifusion", "warmup_steps": w}) for w in WARMUP_SWEEP]
    runs += [(f"pcpp_rho{r}", {"mode": "pcpp", "rho": r}) for r in RHO_SWEEP]
    return runs


def rank_main(rank: int, world: int, port: int, workload: str, sd_unet: UNet2DConditionModel | None,
              out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if workload == "shapes":
            unet, latents, conditioning = shapes_inputs()
            steps, guidance, runs = SHAPES_STEPS, {"name": "cfg", "scale": 5.0}, runs_for(world)
        else:
            assert sd_unet is not None
            unet, (latents, conditioning) = sd_unet, sd15_inputs()
            steps, guidance = SD_STEPS, {"name": "cfg", "scale": 1.0}
            runs = [(mode, {"mode": mode, "warmup_steps": 0}) for mode in MODES]
        results: dict[str, Any] = {}
        for label, kwargs in runs:
            runtime = PatchParallelUNet(unet, **kwargs)
            dist.barrier()
            output, seconds = sample(runtime, steps, latents, conditioning, guidance)
            summary = runtime.stats.summary()
            results[label] = {"output": output, "seconds": seconds, "kwargs": kwargs,
                              "bytes_per_step": [sum(s["sent"].values()) for s in summary["per_step"]],
                              "bytes_sent": summary["bytes_sent"]}
            runtime.detach()
        torch.save(results, Path(out) / f"{workload}_{world}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, workload: str, sd_unet: UNet2DConditionModel | None, out: Path) -> list[dict[str, Any]]:
    mp.start_processes(rank_main, args=(world, free_port(), workload, sd_unet, str(out)), nprocs=world,
                       start_method="spawn")
    return [torch.load(out / f"{workload}_{world}_rank{r}.pt") for r in range(world)]


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(peak**2 / mse))


@torch.no_grad()
def decoded(latents: torch.Tensor, vae: AutoencoderKL) -> np.ndarray:
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image.clamp(-1, 1) + 1) * 127.5).round().numpy()


def workload_rows(workload: str, reference: torch.Tensor, reference_s: float, ranks: dict[int, list[dict[str, Any]]],
                  unet: UNet2DConditionModel, text: torch.Tensor, batch: int, steps: int) -> list[dict[str, Any]]:
    vae = AutoencoderKL.from_pretrained(SHAPES / "vae").eval() if workload == "shapes" else None
    ref = decoded(reference, vae) if vae is not None else reference.numpy()
    peak = 255.0 if vae is not None else float(ref.max() - ref.min())
    latent = reference.shape[-1]
    inventory = layer_inventory(unet, latent, latent, text)
    rows = [{"workload": workload, "ranks": 1, "run": "single device", "psnr_db": None, "bytes_per_step": 0,
             "closed_form_bytes_per_step": 0, "wall_s": round(reference_s, 3),
             "wall_s_per_step": round(reference_s / steps, 4)}]
    for world, results in ranks.items():
        for label, result in results[0].items():
            kwargs = result["kwargs"]
            out = decoded(result["output"], vae) if vae is not None else result["output"].numpy()
            measured = float(np.mean([np.mean(r[label]["bytes_per_step"]) for r in results]))
            closed = float(np.mean([sum(call_bytes(inventory, world_size=world, batch=batch, height=latent,
                                                   width=latent, mode=kwargs["mode"], rank=rank,
                                                   rho=kwargs.get("rho", 0.5)).values()) for rank in range(world)]))
            rows.append({"workload": workload, "ranks": world, "run": label, **kwargs,
                         "psnr_db": round(psnr(out, ref, peak), 2), "bytes_per_step": round(measured),
                         "closed_form_bytes_per_step": round(closed),
                         "wall_s": round(max(r[label]["seconds"] for r in results), 3),
                         "wall_s_per_step": round(max(r[label]["seconds"] for r in results) / steps, 4)})
    return rows


# ---- latency model ------------------------------------------------------------------------------------------

def sdxl_like_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout (2.56 B parameters) on the meta device, without its added time/text embedding (a
    few linear layers, local to every rank: no bytes, negligible FLOPs)."""
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=MODEL_LATENT, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        ).eval()


def patch_flops(unet: UNet2DConditionModel, rows: int, batch: int, text: torch.Tensor) -> float:
    sample = torch.zeros(batch, 4, rows, MODEL_LATENT, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, 500, text)
    return float(counter.get_total_flops())


def latency_model() -> dict[str, Any]:
    unet, batch = sdxl_like_unet(), 2
    text = torch.zeros(batch, 77, 2048, device="meta")
    inventory = layer_inventory(unet, MODEL_LATENT, MODEL_LATENT, text)
    seconds_per_flop = 1.0 / (GPU_FP16_DENSE_TFLOPS * 1e12 * UTILISATION)
    full = patch_flops(unet, MODEL_LATENT, batch, text)
    step_1 = full * seconds_per_flop
    rows: list[dict[str, Any]] = []
    for gpus in (4, 8):
        local = patch_flops(unet, MODEL_LATENT // gpus, batch, text)
        for mode, rho in (("full_sync", 0.5), ("distrifusion", 0.5), ("pcpp", 0.5), ("pcpp", 0.25)):
            # attention to keys beyond the patch's own (QK^T and AV: 2 x 2 q k C flops per extra key);
            # pcpp: rho of each of two neighbours' tokens
            attention = 0.0
            for tokens, width in inventory.attentions:
                own = tokens // gpus
                shared = 2 * round(rho * own) if mode == "pcpp" else tokens - own
                attention += 4 * batch * own * shared * width
            compute = (local + attention) * seconds_per_flop
            volumes = [call_bytes(inventory, world_size=gpus, batch=batch, height=MODEL_LATENT, width=MODEL_LATENT,
                                  element_size=2, mode=mode, rank=r, rho=rho) for r in range(gpus)]
            worst = max(volumes, key=lambda v: sum(v.values()))
            for link, gb_s in LINKS_GB_S.items():
                exchange = (sum(worst.values()) - worst["output_gather"]) / (gb_s * 1e9)
                gather = worst["output_gather"] / (gb_s * 1e9)
                synchronous = compute + exchange + gather
                overlapped = max(compute, exchange) + gather  # the exchange hidden under the next step's compute
                stale_steps = 0 if mode == "full_sync" else MODEL_STEPS - MODEL_WARMUP - 1
                total = (MODEL_STEPS - stale_steps) * synchronous + stale_steps * overlapped
                rows.append({"gpus": gpus, "mode": mode, "rho": rho if mode == "pcpp" else None, "link": link,
                             "bytes_per_step_per_gpu": sum(worst.values()),
                             "compute_ms_per_step": round(compute * 1e3, 2),
                             "comm_ms_per_step": round((exchange + gather) * 1e3, 2),
                             "latency_s": round(total, 3), "speedup": round(MODEL_STEPS * step_1 / total, 2),
                             "papers": PAPERS.get(mode)})
    return {"assumptions": {"model": "SDXL-sized UNet, 1024 px (128 x 128 latent), CFG batch 2, fp16",
                            "steps": MODEL_STEPS, "warmup_steps": MODEL_WARMUP, "gpu": GPU,
                            "gpu_fp16_dense_tflops": GPU_FP16_DENSE_TFLOPS, "utilisation": UTILISATION,
                            "links_gb_s_per_direction": LINKS_GB_S,
                            "single_gpu_tflops_per_step": round(full / 1e12, 2),
                            "single_gpu_ms_per_step": round(step_1 * 1e3, 1)},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/parallel_cpu.json")
    parser.add_argument("--workloads", default="shapes,sd15", help="comma-separated: shapes, sd15 (rows of the "
                        "others already in --out are kept)")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    torch.set_num_threads(1)
    work = Path(args.out).with_suffix(".ranks")
    work.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    report: dict[str, Any] = {"machine": "2 shared CPU cores, gloo, one torch thread per rank",
                              "load_average_start": list(np.round(os.getloadavg(), 2))}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    rows = [row for row in previous.get("rows", []) if row["workload"] not in workloads]
    if "shapes" in workloads:
        unet, latents, conditioning = shapes_inputs()
        reference, seconds = sample(unet, SHAPES_STEPS, latents, conditioning, {"name": "cfg", "scale": 5.0})
        shapes_ranks = {world: run_ranks(world, "shapes", None, work) for world in (2, 4)}
        text = conditioning.model_kwargs(("cond",))["encoder_hidden_states"]
        rows += workload_rows("shapes", reference, seconds, shapes_ranks, unet, text, 2, SHAPES_STEPS)
        print(json.dumps(rows[-1]), flush=True)
    if "sd15" in workloads:
        sd = sd15_unet().share_memory()
        sd_latents, sd_conditioning = sd15_inputs()
        reference, seconds = sample(sd, SD_STEPS, sd_latents, sd_conditioning, {"name": "cfg", "scale": 1.0})
        print(f"sd15 single device: {seconds:.1f} s", flush=True)
        sd_ranks = {}
        for world in (2, 4):
            sd_ranks[world] = run_ranks(world, "sd15", sd, work)
            print(f"sd15 on {world} ranks done", flush=True)
        sd_text = sd_conditioning.model_kwargs(("cond",))["encoder_hidden_states"]
        rows += workload_rows("sd15", reference, seconds, sd_ranks, sd, sd_text, 1, SD_STEPS)
    report["rows"] = rows
    report["workloads_run"] = workloads
    report["latency_model"] = latency_model()
    report["load_average_end"] = list(np.round(os.getloadavg(), 2))
    report["wall_s"] = round(time.perf_counter() - begin, 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    print(f"wrote {args.out} in {report['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
