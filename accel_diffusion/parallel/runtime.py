"""The patch-parallel runtime: a diffusers UNet2DConditionModel whose every rank computes one band of
rows of the latent, for the engine's one denoising loop (``engine/loop.py: denoise``).

``PatchParallelUNet(unet, mode)`` wraps the UNet module by module, in place (``detach`` undoes it):
every k x k convolution becomes a ``HaloConv2d``, every GroupNorm a ``PatchGroupNorm``, every
self-attention gets a ``PatchSelfAttnProcessor`` and every cross-attention a ``CachedCrossAttnProcessor``
(text K/V cached in ``distrifusion`` and ``pcpp``); 1 x 1 convolutions, linear layers, LayerNorms,
nearest upsampling, the time embedding and cross-attention are row-local and stay as they are. A call
takes the whole (replicated) latent, runs this rank's rows through the UNet, all-gathers the output
rows and returns the whole prediction, so the sampler steps identically on every rank. Each call is
one step of the ``CommStats`` (``begin_generation`` starts counting again from step 0).

Every rank must make the same calls in the same order (same latents, timesteps and conditioning):
the collectives inside pair up across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from accel_diffusion.parallel import halo_conv, self_attention
from accel_diffusion.parallel.comm import CommStats, PatchComm
from accel_diffusion.parallel.context import MODES, PatchContext
from accel_diffusion.parallel.cross_attention import CachedCrossAttnProcessor
from accel_diffusion.parallel.group_norm import PatchGroupNorm
from accel_diffusion.parallel.halo_conv import HaloConv2d
from accel_diffusion.parallel.self_attention import PatchSelfAttnProcessor


class PatchParallelUNet(nn.Module):
    """``unet`` split by rows over the ranks of ``group`` (the default process group when None)."""

    def __init__(self, unet: UNet2DConditionModel, mode: str = "full_sync", warmup_steps: int = 4, rho: float = 0.5,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown patch-parallel mode {mode!r}; one of {MODES}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho (the fraction of each neighbour's rows PCPP shares) must be in (0, 1], got {rho}")
        self.unet = unet
        self.mode = mode
        self.context = PatchContext(mode, PatchComm(group), warmup_steps=warmup_steps, rho=rho)
        self._calls = 0
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._processors: list[tuple[Attention, Any]] = []
        self._install()

    @property
    def stats(self) -> CommStats:
        return self.context.comm.stats

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def row_multiple(self) -> int:
        """Latent heights must be a multiple of this: every rank gets whole rows at every resolution."""
        return self.context.world_size * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def begin_generation(self) -> None:
        """Count the next call as step 0 again (one runtime serves generation after generation): drain the
        exchanges in flight, forget stale activations and cached text K/V, zero the byte counts."""
        for layer in self._stateful():
            layer.reset()
        self.stats.reset()
        self._calls = 0

    def _stateful(self) -> list[Any]:
        layers: list[Any] = [m.exchange for m in self.unet.modules() if hasattr(m, "exchange")]
        for attn, _ in self._processors:
            processor = attn.processor
            layers.append(getattr(processor, "exchange", processor))
        return layers

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, *args: Any, return_dict: bool = True,
                **kwargs: Any) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        height = sample.shape[-2]
        if height % self.row_multiple:
            raise ValueError(f"latent height {height} must be a multiple of {self.row_multiple} to split it by rows "
                             f"over {self.context.world_size} ranks through "
                             f"{len(self.unet.config.block_out_channels) - 1} downsamplings")
        self.stats.step = self.context.step = self._calls
        self.context.local_rows, self.context.latent_width = height // self.context.world_size, sample.shape[-1]
        self.context.active = True
        try:
            local = self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        finally:
            self.context.active = False
        self._calls = self.stats.step + 1
        full = torch.cat(self.context.comm.all_gather(local, "output_gather"), dim=-2)
        return UNet2DConditionOutput(sample=full) if return_dict else (full,)

    def _install(self) -> None:
        for name, module in list(self.unet.named_modules()):
            for child_name, child in list(module.named_children()):
                path = f"{name}.{child_name}" if name else child_name
                wrapper: nn.Module | None = None
                if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
                    halo_conv.check_convertible(child, path)
                    wrapper = HaloConv2d(child, self.context, replicated_input=(path == "conv_in"))
                elif isinstance(child, nn.GroupNorm):
                    wrapper = PatchGroupNorm(child, self.context)
                if wrapper is not None:
                    setattr(module, child_name, wrapper)
                    self._replaced.append((module, child_name, child))
            if isinstance(module, Attention) and not module.is_cross_attention:
                self_attention.check_convertible(module, name)
                self._processors.append((module, module.processor))
                module.set_processor(PatchSelfAttnProcessor(self.context, module.processor))
            elif isinstance(module, Attention):
                self._processors.append((module, module.processor))
                module.set_processor(CachedCrossAttnProcessor(self.context, module.processor))

    def detach(self) -> UNet2DConditionModel:
        """Put the UNet's original layers and processors back; returns the UNet."""
        for layer in self._stateful():
            layer.reset()
        for module, child_name, child in reversed(self._replaced):
            setattr(module, child_name, child)
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._replaced.clear()
        self._processors.clear()
        return self.unet
