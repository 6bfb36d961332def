"""Distill the shipped ``shapes`` VAE into a tiny TAESD-style autoencoder (diffusers ``AutoencoderTiny``).

StreamDiffusion swaps Stable Diffusion's VAE for TAESD (``madebyollin/taesd``): an encoder and a
decoder of plain 3x3 convolutions (no GroupNorm, no attention) that speak the same latent space.
This is the same thing for ``shapes``: ``AutoencoderTiny`` with 32 channels, latent 8x8x4, and the
full-resolution stage cut to one convolution (at 32x32 it is the full-resolution convolutions that
cost; see the model card for timings).

Distillation, both halves trained at once on the same batches:

- encoder: MSE to the KL encoder's posterior mean in the UNet's latent space
  (``_model_latents``: scaling factor and latent statistics applied, so ``AutoencoderTiny`` keeps
  ``scaling_factor`` = 1 like TAESD);
- decoder: L1 + MSE to the KL decoder's output for the same latent, where the latent is a posterior
  sample (what the UNet was trained on), a quarter of them perturbed further with Gaussian noise
  (x̂0 estimates of a few-step stream are not clean latents).

Inputs are the shapes renders plus, for a quarter of each batch, off-distribution images (smooth
random colour fields and renders under colour gradients): webcam frames are not renders, and the
tiny encoder must follow the KL encoder there too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm.auto import tqdm

from accel_diffusion.engine.engine import _model_latents, _vae_latents
from accel_diffusion.eval.shapes_judge import to_tensor
from accel_diffusion.eval.timing import median_ms
from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import render_dataset
from accel_diffusion.models.shapes.train import _clipped_step, _cosine, _dir_size

BUILTIN = Path(__file__).resolve().parent.parent / "builtin"
DEFAULT_TEACHER = BUILTIN / "shapes" / "vae"
DEFAULT_OUT = BUILTIN / "shapes_tiny_vae"


def drop_unexpected_config_keys(config_path: Path) -> None:
    """Remove ``block_out_channels``: AutoencoderTiny registers it on save but is not built from it,
    so every load of a diffusers-saved tiny autoencoder would warn "passed ... but are not expected"."""
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_tiny_vae(channels: int = 32) -> AutoencoderTiny:
    """32x32x3 <-> 8x8x4 ``AutoencoderTiny``: encoder blocks (0, 1, 2), decoder blocks (2, 1, 0)."""
    return AutoencoderTiny(
        encoder_block_out_channels=(channels,) * 3,
        decoder_block_out_channels=(channels,) * 3,
        num_encoder_blocks=(0, 1, 2),
        num_decoder_blocks=(2, 1, 0),
        latent_channels=4,
    )


def off_distribution_images(count: int, renders: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half smooth random colour fields (bilinear from 2x2 to 8x8 grids), half renders under a colour gradient."""
    out = np.empty((count, 32, 32, 3), dtype=np.uint8)
    half = count // 2
    for i in range(half):
        cells = int(rng.choice([2, 4, 8]))
        grid = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, cells, cells)).astype(np.float32))
        field = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)[0]
        out[i] = field.permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
    ramp = np.linspace(0.0, 1.0, 32, dtype=np.float32)
    for i in range(half, count):
        base = renders[rng.integers(len(renders))].astype(np.float32)
        direction = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        tint = rng.uniform(-120, 120, size=(1, 1, 3)).astype(np.float32)
        out[i] = np.clip(base + direction * tint + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
    return out


@torch.no_grad()
def teacher_targets(teacher: AutoencoderKL, images: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """The KL encoder's posterior mean and std in the UNet's latent space (scaled), per image."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="teacher encode", mininterval=5.0):
        posterior = teacher.encode(to_tensor(images[i:i + batch_size])).latent_dist
        means.append(_model_latents(teacher, posterior.mean))
        stds.append(posterior.std * teacher.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def train_tiny(
    teacher: AutoencoderKL, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, steps: int,
    batch_size: int, lr: float, perturb: float, gen: torch.Generator, channels: int = 32,
) -> AutoencoderTiny:
    student = make_tiny_vae(channels)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, steps, 100, 0.02))
    student.train()
    bar = tqdm(range(steps), desc="tiny vae", mininterval=5.0)
    for _ in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noisy = torch.rand(batch_size, 1, 1, 1, generator=gen) < 0.25
        z = torch.where(noisy, z + perturb * torch.randn(z.shape, generator=gen), z)
        with torch.no_grad():
            target = _decode_teacher(teacher, z)
        encoder_loss = F.mse_loss(student.encode(x).latents, mean[idx])
        decoded = student.decode(z).sample
        decoder_loss = F.l1_loss(decoded, target) + F.mse_loss(decoded, target)
        loss = encoder_loss + decoder_loss
        _clipped_step(loss, student.parameters(), opt, sched)
        bar.set_postfix(enc=f"{encoder_loss.item():.4f}", dec=f"{decoder_loss.item():.4f}", refresh=False)
    return student.eval()


def _decode_teacher(teacher: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The KL decoder's image (in [-1, 1]) for latents in the UNet's space."""
    return teacher.decode(_vae_latents(teacher, latents)).sample.clamp(-1, 1)


@torch.no_grad()
def measure_tiny_vae(student: AutoencoderTiny, teacher: AutoencoderKL, count: int = 512,
                     seed: int = 4242) -> dict[str, Any]:
    """Fresh renders and off-distribution images: PSNR of both round trips to the image, of the tiny
    decoder to the KL decoder on the same latents, the encoder's latent error relative to the
    latents' spread, and the judge's accuracy on renders decoded by each."""
    from accel_diffusion.eval.image_stats import psnr_per_image, to_uint8_nhwc
    from accel_diffusion.eval.shapes_judge import ShapesJudge

    renders, captions, _ = render_dataset(count, seed=seed)
    off = off_distribution_images(count, renders, np.random.default_rng(seed))
    judge = ShapesJudge.load(None)
    result: dict[str, Any] = {"images": count}
    for label, images in (("renders", renders), ("off_distribution", off)):
        x = to_tensor(images)
        kl_latents = _model_latents(teacher, teacher.encode(x).latent_dist.mean)
        tiny_latents = student.encode(x).latents
        kl_decoded = to_uint8_nhwc((_decode_teacher(teacher, kl_latents) + 1) / 2)
        tiny_on_kl = to_uint8_nhwc((student.decode(kl_latents).sample.clamp(-1, 1) + 1) / 2)
        tiny_round_trip = to_uint8_nhwc((student.decode(tiny_latents).sample.clamp(-1, 1) + 1) / 2)
        row = {
            "kl_round_trip_psnr": float(psnr_per_image(images, kl_decoded).mean()),
            "tiny_round_trip_psnr": float(psnr_per_image(images, tiny_round_trip).mean()),
            "tiny_decoder_vs_kl_decoder_psnr": float(psnr_per_image(kl_decoded, tiny_on_kl).mean()),
            "encoder_relative_rmse": float((tiny_latents - kl_latents).pow(2).mean().sqrt()
                                           / kl_latents.std()),
        }
        if label == "renders":
            row["judge_kl_round_trip"] = judge.prompt_accuracy(kl_decoded, captions)["all"]
            row["judge_tiny_round_trip"] = judge.prompt_accuracy(tiny_round_trip, captions)["all"]
        result[label] = row
    return result


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    a, m = info["args"], info["metrics"]
    r, o = m["renders"], m["off_distribution"]
    lines = [
        "# shapes_tiny_vae — a TAESD-style tiny autoencoder for `shapes`",
        "",
        "A diffusers `AutoencoderTiny` (plain 3x3 convolutions + ReLU, no normalization or attention) that",
        "encodes and decodes the latent space of the `shapes` model's `AutoencoderKL`: it is to `shapes`",
        "what `madebyollin/taesd` is to Stable Diffusion. Stream sessions use it for both halves of every",
        "frame (`vae` = `auto` or `tiny`).",
        "",
        f"Latents are in the UNet's space (`scaling_factor` 1, as TAESD). {a['channels']} channels;",
        "encoder blocks (0, 1, 2), decoder blocks (2, 1, 0): one convolution at 32x32 on each side.",
        "",
        "## Training",
        "",
        f"`accel-diffusion train shapes_tiny_vae --out DIR --seed {a['seed']}`"
        " (`accel_diffusion.models.shapes.train_tiny_vae`),",
        f"{info['torch_threads']} CPU threads, {info['train_seconds']:.0f} s, weights saved as fp16 safetensors.",
        "",
        f"- {a['n_images']} renders + {a['n_off']} off-distribution images (colour fields, tinted renders)",
        "- encoder: MSE to the KL encoder's scaled posterior mean",
        f"- decoder: L1 + MSE to the KL decoder's output on posterior samples (25% perturbed by"
        f" N(0, {a['perturb']}²) in latent space)",
        f"- {a['steps']} steps, batch {a['batch_size']}, AdamW {a['lr']} cosine",
        "",
        f"## Measured (this directory loaded back from disk, fp32; {m['images']} fresh images each)",
        "",
        "| | renders | off-distribution |",
        "|---|---|---|",
        f"| KL round trip PSNR (dB) | {r['kl_round_trip_psnr']:.2f} | {o['kl_round_trip_psnr']:.2f} |",
        f"| tiny round trip PSNR (dB) | {r['tiny_round_trip_psnr']:.2f} | {o['tiny_round_trip_psnr']:.2f} |",
        f"| tiny decoder vs KL decoder, same latents (dB) | {r['tiny_decoder_vs_kl_decoder_psnr']:.2f} |"
        f" {o['tiny_decoder_vs_kl_decoder_psnr']:.2f} |",
        f"| tiny encoder latent RMSE / latent std | {r['encoder_relative_rmse']:.3f} |"
        f" {o['encoder_relative_rmse']:.3f} |",
        "",
        f"Judge accuracy (all three attributes) on the renders' round trips: KL {r['judge_kl_round_trip']:.3f},"
        f" tiny {r['judge_tiny_round_trip']:.3f}.",
        "",
        "Time per 32x32 frame (batch 1, CPU, median): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in info["timing_ms"].items()) + ".",
        "",
        f"Directory size: {info['dir_bytes'] / 1e6:.2f} MB.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


@flushing_denormals()
def train_shapes_tiny_vae(
    out_dir: str | Path = DEFAULT_OUT,
    seed: int = 0,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    n_images: int = 40_000,
    n_off: int = 12_000,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 2e-3,
    perturb: float = 0.3,
    channels: int = 32,
    threads: int | None = 2,
) -> dict[str, Any]:
    """Distill ``teacher_dir`` (an ``AutoencoderKL``) into an ``AutoencoderTiny`` saved to ``out_dir``."""
    args = {k: v for k, v in locals().items() if k not in {"out_dir", "teacher_dir"}}
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = AutoencoderKL.from_pretrained(str(teacher_dir), dtype=torch.float32).eval().requires_grad_(False)
    begin = time.time()
    renders, _, _ = render_dataset(n_images, seed=seed + 1)
    images = np.concatenate([renders, off_distribution_images(n_off, renders, np.random.default_rng(seed))])
    mean, std = teacher_targets(teacher, images)
    student = train_tiny(teacher, images, mean, std, steps, batch_size, lr, perturb, gen, channels)
    train_seconds = time.time() - begin
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    drop_unexpected_config_keys(out / "config.json")
    loaded = AutoencoderTiny.from_pretrained(str(out), dtype=torch.float32).eval()
    frame, latent = torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        timing = {name: median_ms(fn, repeats=200, warmup=20) for name, fn in (
            ("KL encode", lambda: teacher.encode(frame).latent_dist.mode()),
            ("KL decode", lambda: teacher.decode(latent).sample),
            ("tiny encode", lambda: loaded.encode(frame).latents),
            ("tiny decode", lambda: loaded.decode(latent).sample),
        )}
    info: dict[str, Any] = {"args": args, "torch_threads": torch.get_num_threads(), "train_seconds": train_seconds,
                            "metrics": measure_tiny_vae(loaded, teacher), "timing_ms": timing}
    info["dir_bytes"] = _dir_size(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2, default=str))
    write_model_card(out, info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    a = parser.parse_args(argv)
    print(json.dumps(train_shapes_tiny_vae(a.out, seed=a.seed, steps=a.steps), indent=2, default=str))


if __name__ == "__main__":
    main()
