"""Patch parallelism over torch.distributed: a UNet split by rows over ranks, with byte accounting."""

from accel_diffusion.parallel.comm import KINDS, CommStats, PatchComm
from accel_diffusion.parallel.context import MODES
from accel_diffusion.parallel.runtime import PatchParallelUNet

__all__ = ["KINDS", "MODES", "CommStats", "PatchComm", "PatchParallelUNet"]
