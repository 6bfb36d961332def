"""GroupNorm on a row patch with statistics over the whole image.

Each rank computes its per-(image, group) mean and (biased) variance over its rows; ``full_sync``
all-gathers them (2 G float32 per image) and combines them exactly, as the patches hold equal numbers
of elements: mean = mean_i m_i, var = mean_i (v_i + (m_i - mean)^2) (the parallel-variance identity,
with no E[x^2] - E[x]^2 cancellation). ``naive`` normalises each patch with its own statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_diffusion.parallel.context import PatchContext


class PatchGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, context: PatchContext) -> None:
        super().__init__()
        self.norm = norm
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:
            return self.norm(x)
        norm = self.norm
        groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
        mean = groups.mean(dim=-1)
        var = groups.var(dim=-1, unbiased=False)
        if self.context.exchanges:
            stats = torch.stack(self.context.comm.all_gather(torch.stack([mean, var]), "norm_stats"))
            means, variances = stats[:, 0], stats[:, 1]
            mean = means.mean(dim=0)
            var = (variances + (means - mean) ** 2).mean(dim=0)
        out = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.float().view(shape) + norm.bias.float().view(shape)
        return out.to(x.dtype)
