"""Measuring sticks on the ``gmm`` oracle: endpoint error, MMD, mode weights, convergence order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from accel_diffusion.models.gmm import GaussianMixture

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""RBF bandwidths h (kernel exp(−|a−b|²/(2h²))) spanning the default mixture's scales (0.12–4)."""


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected points of shape (N, D), got {arr.shape}")
    return arr


def endpoint_error(x: Any, x_exact: Any) -> dict[str, float]:
    """Per-point L2 distance between samples and their exact endpoints: mean, max and RMS."""
    a, b = _as_float64(x), _as_float64(x_exact)
    if a.shape != b.shape:
        raise ValueError(f"x and x_exact must have the same shape, got {a.shape} and {b.shape}")
    dist = np.linalg.norm(a - b, axis=1)
    return {
        "mean": float(dist.mean()),
        "max": float(dist.max()),
        "rms": float(np.sqrt(np.mean(dist**2))),
    }


def _kernel_sum(
    a: torch.Tensor, b: torch.Tensor, inv_two_h2: torch.Tensor, block: int, exclude_diagonal: bool
) -> float:
    """Σ_{i,j} Σ_h exp(−|a_i − b_j|² / (2h²)), optionally without i = j (a is b), in blocks."""
    total = 0.0
    for lo in range(0, a.shape[0], block):
        d2 = torch.cdist(a[lo : lo + block], b).square_()  # (blk, M)
        k = torch.exp(-d2.unsqueeze(-1) * inv_two_h2).sum(-1)
        if exclude_diagonal:
            idx = torch.arange(k.shape[0])
            k[idx, idx + lo] = 0.0
        total += float(k.sum())
    return total


def mmd_rbf(x: Any, y: Any, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, block: int = 1024) -> float:
    """Unbiased MMD² between point sets with a sum-of-RBF kernel, float64.

    ``k(a, b) = Σ_h exp(−|a − b|² / (2h²))``; the estimate is
    ``mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j)`` (can be slightly
    negative when the sets come from the same distribution). Memory is O(block · M).
    """
    a = torch.from_numpy(_as_float64(x))
    b = torch.from_numpy(_as_float64(y))
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf needs at least 2 points per set, got {n} and {m}")
    h = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    if h.numel() == 0 or bool((h <= 0).any()):
        raise ValueError(f"bandwidths must be positive, got {list(bandwidths)}")
    inv = 1.0 / (2.0 * h * h)
    kxx = _kernel_sum(a, a, inv, block, exclude_diagonal=True) / (n * (n - 1))
    kyy = _kernel_sum(b, b, inv, block, exclude_diagonal=True) / (m * (m - 1))
    kxy = _kernel_sum(a, b, inv, block, exclude_diagonal=False) / (n * m)
    return kxx + kyy - 2.0 * kxy


def mode_weights(x: Any, mixture: GaussianMixture) -> np.ndarray:
    """Fraction of samples whose most probable component (posterior argmax, weights included) is k."""
    modes = mixture.posterior_modes(_as_float64(x))
    return np.bincount(modes, minlength=mixture.num_components) / float(len(modes))


def mode_weight_error(x: Any, mixture: GaussianMixture) -> float:
    """max_k |observed mode weight − true weight w_k|."""
    return float(np.max(np.abs(mode_weights(x, mixture) - mixture.weights.numpy())))


def observed_order(ns: Sequence[float], errors: Sequence[float]) -> float:
    """Convergence order p from errors ≈ C·N^−p: the negated least-squares slope of log e vs log N."""
    n = np.asarray(ns, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if n.shape != e.shape or n.size < 2:
        raise ValueError(f"need at least two (N, error) pairs of equal length, got {n.size} and {e.size}")
    if bool((n <= 0).any()) or bool((e <= 0).any()):
        raise ValueError("step counts and errors must be positive")
    slope = np.polyfit(np.log(n), np.log(e), 1)[0]
    return float(-slope)
