"""Image statistics: HSV saturation and clipping (guidance artefacts), PSNR (fidelity to a reference).

Accepted image inputs (all functions):

- numpy ``uint8`` array, (N, H, W, C) or a single (H, W, C) image, values 0–255;
- a sequence of PIL images (converted to RGB);
- a float torch tensor in [0, 1], (N, C, H, W) or (C, H, W).

:func:`to_uint8_nhwc` turns float tensors into uint8 the way diffusers' ``numpy_to_pil`` does
(clamp to [0, 1], ×255, round), so statistics of a tensor and of its saved image agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CLIP_LOW = 10
"""Channel values strictly below this count as clipped."""
CLIP_HIGH = 250
"""Channel values strictly above this count as clipped."""


def to_uint8_nhwc(images: Any) -> np.ndarray:
    """Images as a uint8 (N, H, W, C) numpy array (see the module docstring for inputs)."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            raise TypeError("uint8 tensors are ambiguous: pass uint8 NHWC numpy or a float NCHW tensor")
        t = images.detach().to("cpu", torch.float64)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4:
            raise ValueError(f"float tensor images must be (N, C, H, W), got {tuple(images.shape)}")
        arr = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return np.ascontiguousarray(arr)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (N, H, W, C), got dtype {images.dtype}")
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4:
            raise ValueError(f"numpy images must be (N, H, W, C), got shape {images.shape}")
        return arr
    if isinstance(images, Sequence) and len(images) > 0 and hasattr(images[0], "convert"):
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    raise TypeError(f"unsupported image input of type {type(images).__name__}")


def saturation_stats(images: Any) -> dict[str, float]:
    """Mean HSV saturation and clipped fraction over all pixels of all images.

    - ``mean_saturation``: mean over pixels of ``s = (max − min)/max`` of the RGB channels
      (s = 0 where max = 0), in [0, 1].
    - ``clipped_fraction``: fraction of channel values (N·H·W·C of them) that are < 10 or > 250;
      10 and 250 themselves are not clipped.
    """
    arr = to_uint8_nhwc(images)
    if arr.shape[-1] < 3:
        raise ValueError(f"saturation needs RGB images (C >= 3), got C = {arr.shape[-1]}")
    rgb = arr[..., :3].astype(np.float64)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    clipped = (arr < CLIP_LOW) | (arr > CLIP_HIGH)
    return {"mean_saturation": float(sat.mean()), "clipped_fraction": float(clipped.mean())}


def _as_255_float(images: Any) -> np.ndarray:
    """(N, H, W, C) float64 on the 0–255 scale; float tensors are scaled by 255 without rounding."""
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        t = images.detach().to("cpu", torch.float64)
        t = t.unsqueeze(0) if t.ndim == 3 else t
        if t.ndim != 4:
            raise ValueError(f"float tensor images must be (N, C, H, W), got {tuple(images.shape)}")
        return t.permute(0, 2, 3, 1).numpy() * 255.0
    return to_uint8_nhwc(images).astype(np.float64)


def psnr_per_image(a: Any, b: Any, data_range: float = 255.0) -> np.ndarray:
    """PSNR of each image pair, ``10 log10(data_range² / MSE)`` on the 0–255 scale (inf if equal).

    Float tensors in [0, 1] are scaled by 255 (not rounded), so ``data_range`` is always 255 for
    any accepted input unless the caller deliberately changes the peak.
    """
    x, y = _as_255_float(a), _as_255_float(b)
    if x.shape != y.shape:
        raise ValueError(f"image sets differ in shape: {x.shape} vs {y.shape}")
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr(a: Any, b: Any, data_range: float = 255.0) -> float:
    """Mean over images of :func:`psnr_per_image` (inf if any pair is identical)."""
    return float(np.mean(psnr_per_image(a, b, data_range)))


@torch.no_grad()
def vae_reconstruction(vae: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Encode uint8 NHWC images with a diffusers VAE and decode the posterior mean: uint8 NHWC again."""
    x = torch.from_numpy(np.ascontiguousarray(to_uint8_nhwc(images))).permute(0, 3, 1, 2)
    x = x.to(vae.device, vae.dtype) / 127.5 - 1.0
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    return to_uint8_nhwc((decoded.float() + 1.0) / 2.0)


def paired_distance(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the per-image RMS pixel distance (0-1 scale) between uint8 ``images`` and the
    ``reference`` image made from the same noise and prompt."""
    diff = images.astype(np.float64) / 255.0 - reference.astype(np.float64) / 255.0
    return float(np.sqrt((diff ** 2).mean(axis=(1, 2, 3))).mean())
