"""Saturation / clipping statistics and PSNR on hand-built images."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
import pytest
import torch
from PIL import Image

from accel_diffusion.eval.image_stats import psnr, psnr_per_image, saturation_stats, to_uint8_nhwc


def solid(rgb: tuple[int, int, int], size: int = 4) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()


def test_pure_red_grey_black_golden() -> None:
    red = saturation_stats(solid((255, 0, 0))[None])
    assert red == {"mean_saturation": 1.0, "clipped_fraction": 1.0}  # 255 > 250 and 0 < 10
    grey = saturation_stats(solid((128, 128, 128))[None])
    assert grey == {"mean_saturation": 0.0, "clipped_fraction": 0.0}
    black = saturation_stats(solid((0, 0, 0))[None])
    assert black == {"mean_saturation": 0.0, "clipped_fraction": 1.0}  # s = 0 where max = 0


def test_mixed_batch_and_partial_saturation() -> None:
    batch = np.stack([solid((255, 0, 0)), solid((200, 100, 50))])
    stats = saturation_stats(batch)
    assert stats["mean_saturation"] == pytest.approx((1.0 + 150 / 200) / 2, abs=1e-15)
    assert stats["clipped_fraction"] == pytest.approx(0.5, abs=1e-15)


def test_clipping_thresholds_are_strict() -> None:
    img = np.array([[[9, 10, 250], [251, 128, 128]]], dtype=np.uint8)  # (1, 2, 3) HWC
    stats = saturation_stats(img)  # a single HWC image is accepted
    assert stats["clipped_fraction"] == pytest.approx(2 / 6, abs=1e-15)  # only 9 and 251
    s0 = (250 - 9) / 250
    s1 = (251 - 128) / 251
    assert stats["mean_saturation"] == pytest.approx((s0 + s1) / 2, abs=1e-15)


def test_float_nchw_and_pil_inputs_agree_with_uint8() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(3, 5, 6, 3), dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).double() / 255.0
    np.testing.assert_array_equal(to_uint8_nhwc(tensor), arr)
    pil = [Image.fromarray(a) for a in arr]
    assert saturation_stats(tensor) == saturation_stats(arr) == saturation_stats(pil)
    with pytest.raises(TypeError):
        saturation_stats(arr.astype(np.float32))


def test_psnr_known_noise_levels() -> None:
    base = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    noisy = base.copy()
    sign = np.where(np.indices((8, 8, 3)).sum(0) % 2 == 0, 1, -1)
    noisy[0] = 128 + 5 * sign  # MSE 25
    noisy[1] = 128 + 10 * sign  # MSE 100
    per = psnr_per_image(base, noisy)
    expected = [10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / 100)]
    np.testing.assert_allclose(per, expected, rtol=0, atol=1e-12)  # 34.151, 28.131 dB
    assert psnr(base, noisy) == pytest.approx(sum(expected) / 2, abs=1e-12)
    # float tensors in [0, 1] use the same 0–255 scale
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255.0  # noqa: E731
    assert psnr(to_t(base), to_t(noisy)) == pytest.approx(sum(expected) / 2, abs=1e-9)
    assert psnr(base, base) == math.inf


def test_psnr_gaussian_noise() -> None:
    rng = np.random.default_rng(1)
    clean = rng.uniform(60, 190, size=(4, 32, 32, 3))
    noisy = np.clip(np.round(clean + rng.normal(0, 10, size=clean.shape)), 0, 255).astype(np.uint8)
    clean_u8 = np.round(clean).astype(np.uint8)
    mse = ((clean_u8.astype(np.float64) - noisy) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(psnr_per_image(clean_u8, noisy), 10 * np.log10(255**2 / mse), rtol=1e-14)
    # std-10 noise → 10 log10(255² / 100) = 28.13 dB, up to sampling error of the MSE (measured 28.23)
    assert psnr(clean_u8, noisy) == pytest.approx(10 * math.log10(255**2 / 100), abs=0.3)
