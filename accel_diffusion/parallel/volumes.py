"""Closed-form communication volumes of one patch-parallel UNet call, per rank, in bytes.

With N ranks, batch B (the model batch: 2 images per image under CFG), element size e and the UNet's
layers (read off the unsplit model by ``layer_inventory``), one call sends and receives, per rank:

- conv halo: sum over k x k convolutions except ``conv_in``, C_in input channels, padding p, width W
  at that layer:       (N - 1) B C_in 2 p W e            (DistriFusion's all-gather of boundaries)
- attention KV: sum over self-attention layers with L tokens and K, V of width C each:
                       (N - 1) B (L / N) 2 C e
- norm statistics: sum over GroupNorms with G groups (mean and variance, float32):
                       (N - 1) B 2 G 4
- output gather: the prediction's C_out channels, H x W latent:
                       (N - 1) B C_out (H / N) W e
``full_sync`` and ``distrifusion`` move the same bytes at every step (DistriFusion displaces the exchange
in time, it does not shrink it). ``pcpp`` exchanges point to point with the n_i neighbours of rank i
(1 at the image's edges, 2 inside; on average 2 (N - 1) / N):

- conv halo:           n_i B C_in p W e
- attention KV:        n_i B r W_l 2 C e, with r = max(1, round(rho H_l / N)) rows of the neighbour's
                       patch at that layer's H_l x W_l resolution
- norm statistics and output gather: as above (all-gathers).
``naive`` moves only the output gather. Sent equals received for every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from accel_diffusion.parallel.self_attention import neighbour_rows


@dataclass
class LayerInventory:
    """The unsplit UNet's exchanging layers, as seen in one call."""

    convs: list[tuple[int, int, int]] = field(default_factory=list)  # (C_in, padding, W) per k x k conv
    attentions: list[tuple[int, int]] = field(default_factory=list)  # (tokens L, K width C) per self-attention
    norms: list[int] = field(default_factory=list)  # groups per GroupNorm
    out_channels: int = 0


@torch.no_grad()
def layer_inventory(unet: UNet2DConditionModel, height: int, width: int, encoder_hidden_states: torch.Tensor,
                    ) -> LayerInventory:
    """Run the plain UNet once on zeros of (1, C_in, height, width) and record the exchanging layers."""
    inventory = LayerInventory(out_channels=unet.config.out_channels)
    handles = []

    def on_conv(module: nn.Conv2d, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        inventory.convs.append((module.in_channels, module.padding[0], args[0].shape[-1]))

    def on_key(module: nn.Linear, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        inventory.attentions.append((args[0].shape[-2], module.out_features))

    def on_norm(module: nn.GroupNorm, *_: object) -> None:
        inventory.norms.append(module.num_groups)

    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1 and name != "conv_in":
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_hook(on_norm))
        elif isinstance(module, Attention) and not module.is_cross_attention:
            handles.append(module.to_k.register_forward_hook(on_key))
    try:
        sample = torch.zeros(1, unet.config.in_channels, height, width, dtype=unet.dtype, device=unet.device)
        unet(sample, 0, encoder_hidden_states[:1], return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return inventory


def call_bytes(inventory: LayerInventory, *, world_size: int, batch: int, height: int, width: int,
               element_size: int = 4, mode: str = "full_sync", rank: int = 0, rho: float = 0.5) -> dict[str, int]:
    """Bytes rank ``rank`` sends (and receives) in one call, per kind (the keys of ``comm.KINDS``)."""
    n, b, e = world_size, batch, element_size
    output = (n - 1) * b * inventory.out_channels * (height // n) * width * e
    norms = sum((n - 1) * b * 2 * g * 4 for g in inventory.norms)
    if mode == "naive":
        return {"conv_halo": 0, "attention_kv": 0, "norm_stats": 0, "output_gather": output}
    if mode == "pcpp":
        neighbours = (rank > 0) + (rank < n - 1)
        attention = 0
        for tokens, c in inventory.attentions:
            level_width = round(width * (tokens / (height * width)) ** 0.5)
            shared_rows = neighbour_rows(rho, tokens // level_width // n)
            attention += neighbours * b * shared_rows * level_width * 2 * c * e
        return {
            "conv_halo": sum(neighbours * b * c * p * w * e for c, p, w in inventory.convs),
            "attention_kv": attention,
            "norm_stats": norms,
            "output_gather": output,
        }
    return {
        "conv_halo": sum((n - 1) * b * c * 2 * p * w * e for c, p, w in inventory.convs),
        "attention_kv": sum((n - 1) * b * (tokens // n) * 2 * c * e for tokens, c in inventory.attentions),
        "norm_stats": norms,
        "output_gather": output,
    }


def mean_step_bytes(inventory: LayerInventory, **kwargs: object) -> float:
    """Bytes sent per call, averaged over the ranks (``call_bytes`` summed over kinds)."""
    world_size = int(kwargs["world_size"])  # type: ignore[call-overload]
    return sum(sum(call_bytes(inventory, **{**kwargs, "rank": r}).values())  # type: ignore[arg-type]
               for r in range(world_size)) / world_size
