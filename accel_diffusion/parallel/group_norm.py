"""GroupNorm on a row patch with statistics over the whole image.

Each rank computes its per-(image, group) mean and (biased) variance over its rows and all-gathers
them (2 G float32 per image). On a synchronous step they combine exactly, as the patches hold equal
numbers of elements: mean = mean_i m_i, var = mean_i (v_i + (m_i - mean)^2) (the parallel-variance
identity, with no E[x^2] - E[x]^2 cancellation). On a displaced step (``distrifusion``, ``pcpp``) the
gathered statistics are one step stale and DistriFusion's ``corrected_async_gn`` applies: for
E[x] and E[x^2] alike, global = mean of the stale gathered values + (fresh local - stale local), i.e. the
stale global moved by this patch's own drift; where the variance this gives is negative, the local
variance is used. ``naive`` normalises each patch with its own statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_diffusion.parallel.context import PatchContext
from accel_diffusion.parallel.exchange import Exchange


class PatchGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, context: PatchContext) -> None:
        super().__init__()
        self.norm = norm
        self.context = context
        self.exchange = Exchange(context, "norm_stats")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:
            return self.norm(x)
        norm = self.norm
        groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
        mean = groups.mean(dim=-1)
        var = groups.var(dim=-1, unbiased=False)
        if self.context.exchanges:
            mean, var = self._global(mean, var)
        out = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.float().view(shape) + norm.bias.float().view(shape)
        return out.to(x.dtype)

    def _global(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = torch.stack([mean, var])
        parts = self.exchange.all_gather(fresh)
        stats = torch.stack(parts)
        means, variances = stats[:, 0], stats[:, 1]
        if self.exchange.fresh:
            global_mean = means.mean(dim=0)
            return global_mean, (variances + (means - global_mean) ** 2).mean(dim=0)
        stale_mean, stale_square = means, variances + means**2
        own = self.context.rank
        global_mean = stale_mean.mean(dim=0) + (mean - stale_mean[own])
        global_square = stale_square.mean(dim=0) + (var + mean**2 - stale_square[own])
        global_var = global_square - global_mean**2
        return global_mean, torch.where(global_var < 0, var, global_var)
