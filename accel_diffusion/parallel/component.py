"""The ``runtime`` component ``patch_parallel``: the engine's UNet split by rows over the ranks of the
torch.distributed process group this process belongs to (start it under torchrun, see
``python -m accel_diffusion.parallel``). Its config is its constructor's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from pydantic import Field

from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.parallel.runtime import PatchParallelUNet
from accel_diffusion.registry import register_component


@register_component("runtime", "patch_parallel")
class PatchParallelRuntime:
    """Patch parallelism over torch.distributed ranks (rows of the latent): full_sync (equal to one device),
    distrifusion (stale-by-one-step activations exchanged asynchronously after ``warmup_steps`` synchronous
    steps), pcpp (``rho`` of each neighbour's rows, point to point), naive (no exchange)."""

    def __init__(
        self,
        mode: Literal["full_sync", "distrifusion", "pcpp", "naive"] = "distrifusion",
        warmup_steps: Annotated[int, Field(ge=0, le=1000)] = 4,
        rho: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5,
    ) -> None:
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.rho = rho

    def check_available(self) -> None:
        """Refuse, before any work, in a process that is not one rank of a process group."""
        if not dist.is_available() or not dist.is_initialized():
            raise IncompatibleStrategyError(
                "strategy.runtime", "patch_parallel needs one process per rank: start them with `torchrun "
                "--nproc_per_node N -m accel_diffusion.parallel generate ...`, or drop strategy.runtime")

    def check_latent(self, unet: UNet2DConditionModel, latent_height: int, factor: int) -> None:
        multiple = dist.get_world_size() * 2 ** (len(unet.config.block_out_channels) - 1)
        if latent_height % multiple:
            raise InvalidRequestError("height", f"patch_parallel over {dist.get_world_size()} ranks needs a height "
                                      f"that is a multiple of {multiple * factor} pixels, got {latent_height * factor}")

    def shared_seeds(self, seeds: Sequence[int]) -> list[int]:
        """Rank 0's seeds on every rank (a request without a seed draws a different one on each)."""
        values = torch.tensor(list(seeds), dtype=torch.int64)
        dist.broadcast(values, src=0)
        return [int(v) for v in values]

    def wrap(self, unet: UNet2DConditionModel) -> PatchParallelUNet:
        return PatchParallelUNet(unet, self.mode, warmup_steps=self.warmup_steps, rho=self.rho)

    @staticmethod
    def report(runtime: PatchParallelUNet) -> dict[str, Any]:
        """This rank's communication, for the result: totals per kind and the bytes of every step."""
        summary = runtime.stats.summary()
        return {
            "rank": summary["rank"],
            "world_size": summary["world_size"],
            "mode": runtime.mode,
            "bytes_sent": summary["bytes_sent"],
            "bytes_received": summary["bytes_received"],
            "bytes_sent_per_step": [sum(step["sent"].values()) for step in summary["per_step"]],
        }
