"""Train the built-in ``shapes`` text-to-image model from scratch (CPU, ~30 minutes).

Stages: render a fixed captioned dataset; train the VAE; encode the dataset to latent
distributions once; train UNet + CLIP text encoder jointly (min-SNR-5 weighting, 10% empty
prompts for classifier-free guidance, AdamW + cosine, EMA); save a standard diffusers
``StableDiffusionPipeline`` directory (float32 weights by default, so that plain diffusers loads and runs it on a
CPU with no ``torch_dtype``); evaluate what was saved (loaded back from disk).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from accel_diffusion.eval.shapes_judge import to_tensor
from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import render_dataset
from accel_diffusion.models.shapes.tokenizer import build_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "builtin" / "shapes"
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def make_vae() -> AutoencoderKL:
    """32x32x3 -> 8x8x4 AutoencoderKL (~0.7M params)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_text_encoder(vocab_size: int, bos_id: int, eos_id: int, hidden: int = 128) -> CLIPTextModel:
    """CLIP text encoder: hidden 128, 3 layers, 4 heads, 16 positions."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(cfg)


def make_unet(cross_attention_dim: int = 128) -> UNet2DConditionModel:
    """UNet on 8x8x4 latents, cross-attention at 4x4 (~4M params)."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def _cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _clipped_step(loss: torch.Tensor, params: Any, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One optimizer step on ``loss`` with the gradient norm clipped to 1, then one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def train_vae(
    images: np.ndarray, steps: int, batch_size: int, lr: float, kl_weight: float, gen: torch.Generator
) -> AutoencoderKL:
    """Train the VAE on uint8 images with L1 + MSE + small KL."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, steps, 100, 0.02))
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=5.0)
    for _ in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen).numpy()
        x = to_tensor(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        _clipped_step(loss, vae.parameters(), opt, sched)
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.0f}", refresh=False)
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """Latent posterior mean and std of every image."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode", mininterval=5.0):
        post = vae.encode(to_tensor(images[i : i + batch_size])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling: float,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    gen: torch.Generator,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Joint UNet + text-encoder training on pre-encoded latents; returns EMA copies."""
    noise_sched = DDPMScheduler(**SCHEDULE)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=5.0) / snr
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, steps, 200, 0.05))
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="unet+text", mininterval=5.0)
    for step in bar:
        idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        tok = ids[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < 0.1
        tok[drop] = empty_ids
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(tok)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        _clipped_step(loss, params, opt, sched)
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_unet, ema_text


@flushing_denormals()
def measure_shapes_model(
    model_dir: str | Path,
    judge_dir: str | Path | None = None,
    steps: int = 25,
    guidance: float = 5.0,
    n_recon: int = 256,
    recon_seed: int = 4242,
) -> dict[str, Any]:
    """Measure a saved pipeline directory: VAE reconstruction PSNR, and the 196-prompt evaluation
    (``accel_diffusion.eval.shapes_eval``) through the engine with DPM-Solver++ and CFG."""
    from accel_diffusion.engine import Engine
    from accel_diffusion.eval.image_stats import psnr_per_image, saturation_stats, vae_reconstruction
    from accel_diffusion.eval.shapes_eval import evaluate_shapes as evaluate_prompts
    from accel_diffusion.eval.shapes_judge import ShapesJudge
    from accel_diffusion.models.registry import ModelRegistry, ModelSpec

    strategy = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"},
                "guidance": {"name": "cfg", "scale": guidance}}
    spec = ModelSpec(id="shapes-eval", source="local", path=str(model_dir), device="cpu", dtype="float32",
                     default_steps=steps, default_strategy=strategy)
    engine = Engine(ModelRegistry([spec]))
    vae = engine.models.get(spec.id).pipeline.vae
    judge = ShapesJudge.load(judge_dir)
    imgs, caps, _ = render_dataset(n_recon, seed=recon_seed)
    rec_u8 = vae_reconstruction(vae, imgs)
    p = psnr_per_image(imgs, rec_u8)
    t0 = time.time()
    prompts = evaluate_prompts(engine, model=spec.id, steps=steps, judge=judge)
    real_stats = saturation_stats(imgs)
    return {
        "n_recon": n_recon,
        "vae_psnr_mean": float(p.mean()),
        "vae_psnr_min": float(p.min()),
        "judge_on_renders": judge.prompt_accuracy(imgs, caps)["all"],
        "judge_on_reconstructions": judge.prompt_accuracy(rec_u8, caps)["all"],
        "generation_seconds": time.time() - t0,
        "prompt_accuracy": prompts["prompt_accuracy"],
        "frechet_distance": prompts["frechet_distance"],
        "frechet_distance_real_baseline": prompts["frechet_distance_real_baseline"],
        "out_of_gamut_fraction": prompts["saturation"]["clipped_fraction"],
        "mean_hsv_saturation": prompts["saturation"]["mean_saturation"],
        "real_mean_hsv_saturation": real_stats["mean_saturation"],
        "sampler": f"DPM-Solver++ 2M (accel-diffusion engine), {steps} steps, CFG {guidance}",
    }


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    """Write README.md describing the model, its training and its measured metrics."""
    m = info.get("metrics", {})
    t = info["stage_seconds"]
    a = info["args"]
    pa = m.get("prompt_accuracy", {})
    lines = [
        "# shapes — a tiny text-to-image latent diffusion model",
        "",
        "A standard diffusers `StableDiffusionPipeline` trained from scratch on this repo's procedural",
        "renders (`accel_diffusion/models/shapes/render.py`): 32x32 RGB images of one shape (circle, square,",
        "triangle, cross) in one of 7 colours on one of 8 backgrounds, captioned like",
        '"a red circle on a blue background" (optionally "a small …"/"a large …").',
        "",
        "Components: CLIPTokenizer built in code (byte-level base + one token per task word, 16 positions);",
        "CLIPTextModel (hidden 128, 3 layers, 4 heads); AutoencoderKL 32x32x3 -> 8x8x4",
        f"(scaling_factor {info['scaling_factor']:.4f} = 1/std of latents); UNet2DConditionModel (sample_size 8,",
        "channels 64/128, cross-attention at 4x4); DPMSolverMultistepScheduler with the training schedule",
        "(1000 steps, scaled_linear 0.00085-0.012, epsilon prediction).",
        "",
        "Load it as any diffusers pipeline: `StableDiffusionPipeline.from_pretrained(DIR)` runs on a CPU with no",
        "`torch_dtype`" + (" (float32 weights)." if a["dtype"] == "fp32" else
                           f" only with `torch_dtype=torch.float32` ({a['dtype']} weights)."),
        "",
        "## Training",
        "",
        f"`accel-diffusion train shapes --out DIR --seed {a['seed']}` (`accel_diffusion.models.shapes.train`),",
        f"{info['torch_threads']} CPU threads, seed {a['seed']}, weights saved as {a['dtype']} safetensors.",
        "",
        f"- dataset: {a['n_images']} renders, 50% of captions with a size word",
        f"- VAE: {a['vae_steps']} steps, batch {a['vae_batch']}, AdamW {a['vae_lr']} cosine, L1 + MSE +"
        f" {a['kl_weight']} KL",
        "- dataset encoded once to latent mean/std; latents sampled per step",
        f"- UNet + text encoder jointly: {a['unet_steps']} steps, batch {a['unet_batch']}, AdamW {a['unet_lr']}"
        f" cosine, min-SNR-5 weighting, 10% empty prompts, EMA {a['ema_decay']}",
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in t.items()],
        "",
        "## Measured (this directory loaded back from disk, fp32)",
        "",
    ]
    if m:
        lines += [
            f"- VAE reconstruction PSNR on {m.get('n_recon', 256)} fresh renders: mean"
            f" {m['vae_psnr_mean']:.2f} dB, min {m['vae_psnr_min']:.2f} dB",
            f"- judge accuracy on fresh renders {m['judge_on_renders']:.3f}, on their VAE reconstructions"
            f" {m['judge_on_reconstructions']:.3f}",
            f"- {m['sampler']}, one image per each of the 196 prompts (seed i for prompt i): all three"
            f" attributes right {pa.get('all', 0):.3f} (shape {pa.get('shape', 0):.3f}, colour"
            f" {pa.get('color', 0):.3f}, background {pa.get('background', 0):.3f})",
            f"- pixels < 10 or > 250 in generations: {m['out_of_gamut_fraction']:.4f} (real renders: 0);"
            f" mean HSV saturation {m['mean_hsv_saturation']:.3f} (real {m['real_mean_hsv_saturation']:.3f})",
            f"- Fréchet distance to 2000 real renders in the judge's feature space (FD-shapes):"
            f" {m['frechet_distance']:.1f} (as many fresh real renders score"
            f" {m['frechet_distance_real_baseline']:.1f} against the same reference)",
        ]
    lines += [f"- directory size: {info['dir_bytes'] / 1e6:.1f} MB", ""]
    if info.get("note"):
        lines += ["## Note", "", info["note"], ""]
    (out / "README.md").write_text("\n".join(lines))


@flushing_denormals()
def train_shapes(
    out_dir: str | Path = DEFAULT_OUT,
    seed: int = 0,
    n_images: int = 80_000,
    vae_steps: int = 2000,
    vae_batch: int = 64,
    vae_lr: float = 1e-3,
    kl_weight: float = 1e-6,
    unet_steps: int = 2800,
    unet_batch: int = 128,
    unet_lr: float = 4e-4,
    ema_decay: float = 0.999,
    dtype: str = "fp32",
    evaluate: bool = True,
    judge_dir: str | Path | None = None,
    threads: int | None = 2,
) -> dict[str, Any]:
    """Train the shapes pipeline from scratch and save it to ``out_dir``; returns timings and metrics."""
    args = {k: v for k, v in locals().items() if k not in {"out_dir", "judge_dir"}}
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    stage: dict[str, float] = {}

    t0 = time.time()
    images, captions, _ = render_dataset(n_images, seed=seed)
    tokenizer = build_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    empty_ids = tokenizer("", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    stage["render+tokenize"] = time.time() - t0

    t0 = time.time()
    vae = train_vae(images, vae_steps, vae_batch, vae_lr, kl_weight, gen)
    stage["vae"] = time.time() - t0

    t0 = time.time()
    mean, std = encode_dataset(vae, images)
    sample = mean[:20000] + std[:20000] * torch.randn(mean[:20000].shape, generator=gen)
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    stage["encode"] = time.time() - t0

    t0 = time.time()
    text_encoder = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = make_unet(text_encoder.config.hidden_size)
    unet, text_encoder = train_unet(
        mean, std, scaling, ids, empty_ids, text_encoder, unet, unet_steps, unet_batch, unet_lr, ema_decay, gen
    )
    stage["unet+text"] = time.time() - t0

    t0 = time.time()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    pipe = StableDiffusionPipeline(
        vae=vae.to(torch_dtype),
        text_encoder=text_encoder.to(torch_dtype),
        tokenizer=tokenizer,
        unet=unet.to(torch_dtype),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULE, thresholding=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    stage["save"] = time.time() - t0

    info: dict[str, Any] = {
        "args": args,
        "scaling_factor": scaling,
        "torch_threads": torch.get_num_threads(),
        "stage_seconds": stage,
    }
    if evaluate:
        t0 = time.time()
        metrics = measure_shapes_model(out, judge_dir)
        stage["evaluate"] = time.time() - t0
        info["metrics"] = metrics
    info["dir_bytes"] = _dir_size(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2, default=str))
    write_model_card(out, info)
    info["dir_bytes"] = _dir_size(out)
    return info


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m accel_diffusion.models.shapes.train --out DIR --seed S``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=80_000)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--unet-steps", type=int, default=2800)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                    help="weights as saved (fp32: what plain diffusers loads and runs on a CPU with no torch_dtype)")
    ap.add_argument("--no-eval", action="store_true")
    a = ap.parse_args(argv)
    info = train_shapes(
        a.out,
        seed=a.seed,
        n_images=a.n_images,
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        dtype=a.dtype,
        evaluate=not a.no_eval,
    )
    print(json.dumps(info, indent=2, default=str))


if __name__ == "__main__":
    main()
