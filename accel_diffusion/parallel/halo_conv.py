"""A k x k convolution on a row patch: the rows its kernel reaches above and below the patch (the halo)
come from the neighbouring patches.

- ``full_sync`` and ``distrifusion`` use DistriFusion's scheme (mit-han-lab/distrifuser): every rank
  publishes its top and bottom ``padding`` rows, shape (B, C, 2 p, W), with one all-gather; rank i keeps
  the bottom rows of rank i - 1 and the top rows of rank i + 1 (fresh in ``full_sync`` and warm-up
  steps, one step stale after them).
- ``pcpp`` sends its top rows to rank - 1 and its bottom rows to rank + 1 only, point to point (PCPP's
  neighbour exchange replacing the all-gather; stale after the warm-up like DistriFusion's).
- ``naive`` uses no halo.
Past the image's edges the halo is zeros, as the unsplit convolution's padding. The first convolution
(``conv_in``) sees the replicated latent and slices its own rows with their halo, with no exchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accel_diffusion.parallel.context import PatchContext
from accel_diffusion.parallel.exchange import Exchange


def check_convertible(conv: nn.Conv2d, name: str) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation != (1, 1):
        raise NotImplementedError(f"patch parallelism supports zero-padded, undilated convolutions; {name} has "
                                  f"padding_mode={conv.padding_mode!r}, padding={conv.padding}, "
                                  f"dilation={conv.dilation}")


class HaloConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, context: PatchContext, replicated_input: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.context = context
        self.replicated_input = replicated_input
        self.exchange = Exchange(context, "conv_halo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:
            return self.conv(x)
        pad = self.conv.padding[0]
        extended = self._with_halo(x, pad)
        conv = self.conv
        return F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)

    def _with_halo(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        context = self.context
        if self.replicated_input:  # the whole latent: take this rank's rows and their halo, zeros past the edges
            rows = x.shape[-2] // context.world_size
            start, stop = context.rank * rows, (context.rank + 1) * rows
            top, bottom = max(start - pad, 0), min(stop + pad, x.shape[-2])
            return F.pad(x[..., top:bottom, :], (0, 0, pad - (start - top), pad - (bottom - stop)))
        if pad == 0:
            return x
        above: torch.Tensor | None = None
        below: torch.Tensor | None = None
        if context.exchanges and context.mode == "pcpp":
            above, below = self.exchange.neighbours(x[..., :pad, :], x[..., -pad:, :])
        elif context.exchanges:
            parts = self.exchange.all_gather(torch.cat([x[..., :pad, :], x[..., -pad:, :]], dim=-2))
            if context.rank > 0:
                above = parts[context.rank - 1][..., pad:, :]
            if context.rank < context.world_size - 1:
                below = parts[context.rank + 1][..., :pad, :]
        zeros = x.new_zeros(*x.shape[:-2], pad, x.shape[-1])
        return torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim=-2)
