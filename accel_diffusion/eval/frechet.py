"""Fréchet distance between image sets in a caller-chosen feature space (e.g. FD-shapes).

The statistics and the distance come from torchmetrics' ``FrechetInceptionDistance`` with a custom
feature module (``feature=`` an ``nn.Module`` with a ``num_features`` attribute, ``normalize=False``
so images reach the module unchanged); no matrix square root is written here. torchmetrics
accumulates feature sums in float64 and evaluates ``Tr(√(Σ_r Σ_f))`` from the eigenvalues of
``Σ_r Σ_f``.

Feature extractor contract: an ``nn.Module`` or any callable that takes uint8 images in the
layout given by ``input_layout`` and returns (N, num_features) features:

- ``"nhwc"`` (default): a ``torch.uint8`` tensor (N, H, W, C), what the engine returns;
- ``"nchw"``: a ``torch.uint8`` tensor (N, C, H, W), torchmetrics' own convention;
- ``"numpy_nhwc"``: a uint8 numpy array (N, H, W, C), e.g. ``ShapesJudge.features``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from accel_diffusion.eval.image_stats import to_uint8_nhwc

INPUT_LAYOUTS = ("nhwc", "nchw", "numpy_nhwc")

FeatureExtractor = nn.Module | Callable[[Any], torch.Tensor]


def _to_layout(images_nhwc: torch.Tensor, input_layout: str) -> Any:
    if input_layout == "nchw":
        return images_nhwc.permute(0, 3, 1, 2).contiguous()
    if input_layout == "numpy_nhwc":
        return images_nhwc.cpu().numpy()
    return images_nhwc


class _FeatureAdapter(nn.Module):
    """Wraps the user's extractor for torchmetrics: fixed layout, shape check, float64 output."""

    def __init__(self, extractor: FeatureExtractor, num_features: int, input_layout: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features
        self.input_layout = input_layout

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.extractor(_to_layout(images_nhwc, self.input_layout))
        feats = torch.as_tensor(feats)
        if feats.ndim != 2 or feats.shape != (images_nhwc.shape[0], self.num_features):
            raise ValueError(
                f"feature extractor returned shape {tuple(feats.shape)}, "
                f"expected ({images_nhwc.shape[0]}, {self.num_features})"
            )
        return feats.to(torch.float64)


class FrechetDistance:
    """Accumulates real and generated image features and returns their Fréchet distance.

    ``update`` takes uint8 NHWC numpy arrays, PIL image lists or float NCHW tensors in [0, 1]
    (see :func:`accel_diffusion.eval.image_stats.to_uint8_nhwc`).
    """

    def __init__(self, feature_extractor: FeatureExtractor, num_features: int, input_layout: str = "nhwc") -> None:
        if input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout: unsupported {input_layout!r} (allowed: {', '.join(INPUT_LAYOUTS)})")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self._metric = FrechetInceptionDistance(
            feature=_FeatureAdapter(feature_extractor, num_features, input_layout),
            reset_real_features=True,
            normalize=False,
        )

    def update(self, images: Any, real: bool) -> None:
        """Add a batch of images to the real (``real=True``) or generated set."""
        arr = to_uint8_nhwc(images)
        self._metric.update(torch.from_numpy(np.ascontiguousarray(arr)), real=real)

    def compute(self) -> float:
        """The Fréchet distance ``|μ_r − μ_f|² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½)`` (needs ≥ 2 of each)."""
        return float(self._metric.compute())

    def reset(self) -> None:
        """Forget both image sets."""
        self._metric.reset()


def frechet_distance(
    real_images: Any, fake_images: Any, feature_extractor: FeatureExtractor, input_layout: str = "nhwc"
) -> float:
    """Fréchet distance between two image sets in ``feature_extractor``'s feature space.

    The feature size is read from ``feature_extractor.num_features`` if present, else from one
    forward pass on the first real image.
    """
    real = to_uint8_nhwc(real_images)
    num = getattr(feature_extractor, "num_features", None)
    if not isinstance(num, int):
        probe = _to_layout(torch.from_numpy(np.ascontiguousarray(real[:1])), input_layout)
        with torch.no_grad():
            num = int(torch.as_tensor(feature_extractor(probe)).shape[-1])
    fd = FrechetDistance(feature_extractor, num, input_layout)
    fd.update(real, real=True)
    fd.update(fake_images, real=False)
    return fd.compute()
